"""Generate a tiny, real-architecture Llama model directory (no torch, no network).

The default model is the smallest one vLLM's CPU build serves (its attention needs head_dim >= 32):
hidden 64, intermediate 128, 2 layers, 4 heads, 4 KV heads, head_dim 32, max positions 256, and a
512-token byte-level BPE tokenizer trained offline with ``tokenizers``. Weights are random and
written with ``safetensors.numpy``; the output is a normal Hugging Face model directory
(config.json, generation_config.json, tokenizer files, model.safetensors).

Options scale it up for benchmarks (``--target-bytes 1GiB`` widens and deepens the model and shards
the weights with an index, as the Hub does), add a ``pytorch_model.bin`` copy (a repo with both
weight formats; needs torch), or write a GPTQ/AWQ-shaped variant: 4-bit packed ``qweight``/``qzeros``
int32 tensors, float16 ``scales`` (and GPTQ's ``g_idx``) in each layer's linear projections, with a
matching ``quantization_config``. The values are random: such a variant is for readers of shapes and
sizes (the memory planner), not for generating text.

    python -m vllm_runtime.devhub.tiny_model OUT_DIR [--target-bytes 1GiB] [--with-bin]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vllm_runtime.units import parse_size  # re-exported: tests and benches size models with it

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Text the tokenizer is trained on: enough variety for a 512-token vocabulary.
_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. vLLM serves large language models fast. "
    "Kubernetes runs containers; an operator reconciles custom resources into pods, jobs and services. "
    "Hello world! Once upon a time there was a tiny model that answered every prompt with gibberish. "
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ? ! ' \" "
)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 32
    max_position_embeddings: int = 256
    vocab_size: int = VOCAB_SIZE
    tie_word_embeddings: bool = False

    def layer_parameters(self) -> int:
        h, q = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    def parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_hidden_layers * self.layer_parameters()


DEFAULT_SHAPE = ModelShape()
# The shape a --target-bytes model grows from: Llama-like proportions, head_dim 64.
_LARGE_SHAPE = ModelShape(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=64,
    max_position_embeddings=2048,
)
_DTYPES = {"float32": np.float32, "float16": np.float16}


def shape_for_target_bytes(target_bytes: int, bytes_per_param: int) -> ModelShape:
    """The shape whose weights come closest to ``target_bytes`` by adding layers to a 1024-wide model."""
    target_params = target_bytes // bytes_per_param
    if target_params <= DEFAULT_SHAPE.parameters():
        return DEFAULT_SHAPE
    base = replace(_LARGE_SHAPE, num_hidden_layers=0)
    layers = max(1, math.ceil((target_params - base.parameters()) / base.layer_parameters()))
    return replace(_LARGE_SHAPE, num_hidden_layers=layers)


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a byte-level BPE tokenizer offline and write the files transformers loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Synthetic words on top of the prose give BPE enough distinct pairs to fill the vocabulary.
    synthetic = " ".join(f"{a}{b}{c}" for a in "bdfgklmnprst" for b in "aeiou" for c in ("n", "r", "s", "l", "ta", "mo"))
    tokenizer.train_from_iterator([_TRAINING_TEXT, synthetic] * 20, trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": 256,
            "clean_up_tokenization_spaces": False,
            "chat_template": (
                "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}"
            ),
        },
    )
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def model_config(shape: ModelShape, dtype: str, quantization: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_position_embeddings,
        "vocab_size": shape.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "transformers_version": "4.57.0",
    }
    group = quant_group_size(shape)
    if quantization == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
        }
    elif quantization == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                         "version": "gemm"}
    return config


def quant_group_size(shape: ModelShape) -> int:
    """128 as usual, or the smallest input width when a tiny model's projections are narrower."""
    return min(128, shape.hidden_size, shape.intermediate_size)


_PACK = 8  # 4-bit values per int32


def _quantized_tensors(
    name: str, out_features: int, in_features: int, method: str, group: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """GPTQ/AWQ tensors of one linear layer (``name`` without ``.weight``), with their checkpoints' shapes."""
    def packed(rows: int, cols: int) -> np.ndarray:
        return rng.integers(-(2**31), 2**31 - 1, size=(rows, cols), dtype=np.int32)

    scales = (rng.random((in_features // group, out_features), dtype=np.float32) * 0.01).astype(np.float16)
    if method == "gptq":
        return {
            f"{name}.qweight": packed(in_features // _PACK, out_features),
            f"{name}.qzeros": packed(in_features // group, out_features // _PACK),
            f"{name}.scales": scales,
            f"{name}.g_idx": (np.arange(in_features, dtype=np.int32) // group),
        }
    return {  # awq (gemm)
        f"{name}.qweight": packed(in_features, out_features // _PACK),
        f"{name}.qzeros": packed(in_features // group, out_features // _PACK),
        f"{name}.scales": scales,
    }


def _tensor_shapes(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        tensors += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    tensors.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        tensors.append(("lm_head.weight", (shape.vocab_size, h)))
    return tensors


def _write_weights(
    out_dir: Path, shape: ModelShape, dtype: str, seed: int, shard_bytes: int, with_bin: bool,
    quantization: str | None = None,
) -> list[str]:
    """Write safetensors shards (plus an index when sharded); optionally the same tensors as .bin."""
    from safetensors.numpy import save_file

    np_dtype = _DTYPES[dtype]
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_size = 0
    group = quant_group_size(shape)
    for name, tensor_shape in _tensor_shapes(shape):
        arrays: dict[str, np.ndarray]
        if name.endswith("norm.weight"):
            arrays = {name: np.ones(tensor_shape, dtype=np_dtype)}
        elif quantization and name.startswith("model.layers.") and name.endswith("_proj.weight"):
            out_features, in_features = tensor_shape
            arrays = _quantized_tensors(name[: -len(".weight")], out_features, in_features, quantization, group, rng)
        else:
            arrays = {name: (rng.standard_normal(tensor_shape, dtype=np.float32) * 0.02).astype(np_dtype, copy=False)}
        nbytes = sum(a.nbytes for a in arrays.values())
        if shard_size and shard_size + nbytes > shard_bytes:
            shards.append({})
            shard_size = 0
        shards[-1].update(arrays)
        shard_size += nbytes
    written: list[str] = []
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        written.append("model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for index, tensors in enumerate(shards, start=1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
            written.append(filename)
            for name, array in tensors.items():
                weight_map[name] = filename
                total += array.nbytes
        _write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
        written.append("model.safetensors.index.json")
    if with_bin:
        import torch  # only for the .bin copy: PyTorch's pickle format needs torch to write

        state = {name: torch.from_numpy(array) for tensors in shards for name, array in tensors.items()}
        torch.save(state, out_dir / "pytorch_model.bin")
        written.append("pytorch_model.bin")
    return written


def generate(
    out_dir: str | Path,
    *,
    target_bytes: int | None = None,
    shape: ModelShape | None = None,
    dtype: str = "float32",
    seed: int = 0,
    shard_bytes: int = 2 * 1024**3,
    with_bin: bool = False,
    quantization: str | None = None,
) -> Path:
    """Write a model directory and return its path. Deterministic for a given seed and shape."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bytes_per_param = np.dtype(_DTYPES[dtype]).itemsize
    if shape is None:
        shape = shape_for_target_bytes(target_bytes, bytes_per_param) if target_bytes else DEFAULT_SHAPE
    train_tokenizer(out, shape.vocab_size)
    _write_json(out / "config.json", model_config(shape, dtype, quantization))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "transformers_version": "4.57.0"},
    )
    if quantization not in (None, "gptq", "awq"):
        raise ValueError(f"quantization {quantization!r} is not one of gptq, awq")
    _write_weights(out, shape, dtype, seed, shard_bytes, with_bin, quantization)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("out_dir")
    parser.add_argument("--target-bytes", type=parse_size, help="approximate weight size, e.g. 1GiB")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=parse_size, default=2 * 1024**3, help="max bytes per safetensors shard")
    parser.add_argument("--with-bin", action="store_true", help="also write pytorch_model.bin (needs torch)")
    parser.add_argument("--quantization", choices=["gptq", "awq"], help="write a GPTQ/AWQ-shaped variant (random 4-bit packed weights)")
    args = parser.parse_args(argv)
    out = generate(
        args.out_dir,
        target_bytes=args.target_bytes,
        dtype=args.dtype,
        seed=args.seed,
        shard_bytes=args.shard_size,
        with_bin=args.with_bin,
        quantization=args.quantization,
    )
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({total} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
