"""Run ``vllm-runtime serve``'s GPU memory check on a real GPU (NVML), as a pod would.

Writes two model directories holding only what the planner reads (config.json and a bf16 safetensors
header, no weights): Llama-3.1-8B- and Llama-3.1-70B-shaped. Then runs the ``serve`` command in a
subprocess (vLLM replaced by ``python -c pass``, so a start that passes the check exits 0 at once):

1. 8B while this process holds most of the GPU in a torch tensor: refused (exit 3, InsufficientGPUMemory,
   "another process holds GPU memory"), vLLM never started;
2. 8B after the tensor is freed: passes, the stand-in vLLM runs;
3. 70B on one GPU: refused with the planner's explanation and suggestions;
4. 70B with ``--skip-memory-check``: starts anyway.

    PYTHONPATH=runtime:.venv-gpuvendor python bench/gpu/check_serve_memory.py --out "$OUT"

Needs torch with CUDA and nvidia-ml-py (and prometheus-client, which ``serve`` imports); not vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "vocab_size": 128256}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64}  # fmt: skip
SERVE_ONLY = (
    "import sys, argparse, logging; from vllm_runtime import serve; p = argparse.ArgumentParser(); "
    "serve.register(p.add_subparsers()); logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s'); "
    "a = p.parse_args(); sys.exit(a.func(a))"
)


def write_headers_only(directory: Path, dims: dict[str, int]) -> Path:
    """A Llama-shaped model directory: config.json and a safetensors file that is only its header."""
    directory.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, **dims}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    q, kv = dims["num_attention_heads"] * dims["head_dim"], dims["num_key_value_heads"] * dims["head_dim"]
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(dims["num_hidden_layers"]):
        layer = f"model.layers.{n}."
        shapes.update({
            layer + "input_layernorm.weight": [h], layer + "post_attention_layernorm.weight": [h],
            layer + "self_attn.q_proj.weight": [q, h], layer + "self_attn.k_proj.weight": [kv, h],
            layer + "self_attn.v_proj.weight": [kv, h], layer + "self_attn.o_proj.weight": [h, q],
            layer + "mlp.gate_proj.weight": [i, h], layer + "mlp.up_proj.weight": [i, h],
            layer + "mlp.down_proj.weight": [h, i],
        })  # fmt: skip
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * _prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    return directory


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_serve(work: Path, name: str, model: Path, *options: str) -> dict[str, Any]:
    cache = work / f"cache-{name}"
    termination = work / f"termination-{name}"
    cmd = [
        sys.executable, "-c", SERVE_ONLY, "serve", "--model", str(model), "--cache-dir", str(cache),
        "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", str(free_port()),
        "--termination-message-path", str(termination), "--vllm-command", f"{sys.executable} -c pass",
        *options, "--", "--max-model-len", "8192",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    seconds = time.monotonic() - started
    status_files = sorted((cache / "state").glob("serve-*.json"))
    status = json.loads(status_files[0].read_text()) if status_files else None
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "memory check" in ln or "not starting" in ln]
    return {
        "scenario": name,
        "exitCode": proc.returncode,
        "seconds": round(seconds, 2),
        "logLines": lines,
        "terminationMessage": json.loads(termination.read_text()) if termination.exists() else None,
        "vllmStarted": "starting vLLM:" in proc.stderr,
        "memoryCheck": status.get("memoryCheck") if status else None,
        "stderrTail": proc.stderr[-1500:] if proc.returncode not in (0, 3) else "",
    }


def gpu_facts() -> dict[str, Any]:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    free, total = torch.cuda.mem_get_info()
    driver = pynvml.nvmlSystemGetDriverVersion()
    return {
        "card": torch.cuda.get_device_name(0),
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nvmlTotal": int(info.total),
        "nvmlReserved": int(info.reserved),
        "nvmlFree": int(info.free),
        "cudaTotal": int(total),
        "cudaFree": int(free),
        "visibleDevices": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="directory for check_serve_memory.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    small = write_headers_only(work / "llama-8b-shaped", LLAMA_8B)
    large = write_headers_only(work / "llama-70b-shaped", LLAMA_70B)
    torch.cuda.init()
    facts: dict[str, Any] = {"before": gpu_facts()}
    results = []

    free, _ = torch.cuda.mem_get_info()
    hold_bytes = free - 10 * GIB  # leave 10 GiB: far below 0.9 x total
    held = torch.empty(hold_bytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    facts["whileHeld"] = {**gpu_facts(), "heldBytes": hold_bytes}
    results.append(run_serve(work, "8b-gpu-busy", small))
    del held
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    facts["afterFree"] = gpu_facts()
    results.append(run_serve(work, "8b-gpu-free", small))
    results.append(run_serve(work, "70b-one-gpu", large))
    results.append(run_serve(work, "70b-skip-check", large, "--skip-memory-check"))

    expected = {"8b-gpu-busy": 3, "8b-gpu-free": 0, "70b-one-gpu": 3, "70b-skip-check": 0}
    passed = all(r["exitCode"] == expected[r["scenario"]] for r in results)
    passed = passed and not results[0]["vllmStarted"] and not results[2]["vllmStarted"]
    report = {"facts": facts, "results": results, "pass": passed}
    Path(args.out, "check_serve_memory.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
