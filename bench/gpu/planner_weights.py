"""Planner weights vs bytes actually allocated on a GPU (run on the device machine; no network).

Generates, on the GPU machine's disk, models with real Llama-style tensor names and shapes:
  * bf16: >= 1 GB, sharded in two files with an index, as save_pretrained writes them;
  * gptq: the same architecture as GPTQ 4-bit / group 128 (int32 qweight/qzeros, fp16 scales, g_idx);
  * awq:  the same as AWQ 4-bit / group 128 (GEMM layout).
For each: plans it with ``vllm_runtime.planner`` (headers only), then loads every file with
``safetensors.torch.load_file(device="cuda")``, keeps the tensors, and records the
``torch.cuda.memory_allocated()`` delta (and NVML's used-memory delta, which includes allocator slack).

    PYTHONPATH=runtime python bench/gpu/planner_weights.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "runtime"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "models"))

from generate import GPTQ, AWQ, llama_like  # noqa: E402  (the fixture generator's tensor layouts)
from vllm_runtime.planner import plan_model  # noqa: E402

# A TinyLlama-1.1B-shaped model: ~1.1 B parameters, 2.2 GB in bf16.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
# A Qwen2.5-1.5B-shaped model (q/k/v biases, 2 KV heads, embeddings untied): 1.78 B parameters, 3.6 GB in bf16.
QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32, "F32": torch.float32}


def write_model(root: Path, config: dict, dtype: str, quant: dict | None, shards: int) -> None:
    root.mkdir(parents=True)
    spec = llama_like(config, dtype=dtype, quant=quant, qkv_bias=config["model_type"] == "qwen2")
    names = list(spec)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {}
        for n in names[i * per : (i + 1) * per]:
            dt, shape = spec[n]
            part[n] = torch.empty(shape, dtype=DTYPES[dt]).fill_(1)
            weight_map[n] = fname
        save_file(part, str(root / fname), metadata={"format": "pt"})
        del part
    if shards > 1:
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config))


def measure(root: Path) -> dict:
    from safetensors.torch import load_file

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    nvml_before = _nvml_used()
    start = time.perf_counter()
    kept = [load_file(str(f), device="cuda") for f in sorted(root.glob("*.safetensors"))]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    allocated = torch.cuda.memory_allocated() - before
    nvml = _nvml_used() - nvml_before
    raw = sum(t.numel() * t.element_size() for part in kept for t in part.values())
    del kept
    gc.collect()
    torch.cuda.empty_cache()
    return {"allocated_bytes": allocated, "tensor_bytes": raw, "nvml_used_delta_bytes": nvml, "load_seconds": round(seconds, 2)}


def _nvml_used() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:
        return -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.cuda.init()
    info = {"device": torch.cuda.get_device_name(0), "total_memory_bytes": torch.cuda.get_device_properties(0).total_memory}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["nvml_total_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
    except Exception as exc:  # NVML is optional for the measurement itself
        info["nvml_error"] = str(exc)
    fp16 = {**CONFIG, "torch_dtype": "float16"}
    qwen_fp16 = {**QWEN_1_5B, "torch_dtype": "float16"}
    cases = {
        "llama-1.1b-bf16": ({**CONFIG}, "BF16", None, 2),
        "llama-1.1b-gptq-4bit-g128": ({**fp16, "quantization_config": GPTQ}, "F16", GPTQ, 1),
        "llama-1.1b-awq-4bit-g128": ({**fp16, "quantization_config": AWQ}, "F16", AWQ, 1),
        "qwen-1.5b-bf16": ({**QWEN_1_5B}, "BF16", None, 2),
        "qwen-1.5b-gptq-4bit-g128": ({**qwen_fp16, "quantization_config": GPTQ}, "F16", GPTQ, 1),
    }
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for name, (config, dtype, quant, shards) in cases.items():
            root = Path(tmp) / name
            write_model(root, config, dtype, quant, shards)
            plan = plan_model(str(root), gpu_memory_bytes=info["total_memory_bytes"])
            m = measure(root)
            rows.append({
                "model": name, "parameters": plan.parameters,
                "predicted_stored_bytes": plan.weight_bytes, "predicted_allocated_bytes": plan.weight_bytes_allocated, **m,
                "stored_vs_allocated_error": (plan.weight_bytes - m["allocated_bytes"]) / m["allocated_bytes"],
                "predicted_vs_allocated_error": (plan.weight_bytes_allocated - m["allocated_bytes"]) / m["allocated_bytes"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    result = {**info, "torch": torch.__version__, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "planner_weights.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
