"""Generate tiny LoRA adapters (PEFT format) for the tiny Llama of ``tiny_model`` (no torch, no network).

An adapter directory holds what PEFT's ``save_pretrained`` writes and vLLM loads:
``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``, the base model) and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` (r x in) and
``lora_B.weight`` (out x r) per targeted projection. ``lora_B`` is non-zero (a freshly initialised PEFT
adapter has ``lora_B == 0`` and changes nothing), large enough that greedy completions differ from the
base model's.

Broken variants, for the failure paths (``VARIANTS``):

- ``rank-too-high``: rank 64, above any ``--max-lora-rank`` the tests give;
- ``other-base``: trained for a Llama of hidden size 128 (the tensors' shapes do not fit the base);
- ``no-weights``: ``adapter_config.json`` only;
- ``unsupported-module``: also targets ``input_layernorm``, which LoRA cannot wrap.

    python -m vllm_runtime.devhub.tiny_adapter OUT_DIR [--rank 8] [--seed 1] [--variant other-base]

``publish`` puts an adapter on the loopback Hub (``DevHub``) at several revisions: one commit per version
(each version its own seed, so its weights and completions differ), tagged ``v1``, ``v2``, ...; ``main``
points at the last one.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_runtime.devhub.tiny_model import DEFAULT_SHAPE, ModelShape

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
BASE_REPO = "test-org/tiny-llama"
VARIANTS = ("good", "rank-too-high", "other-base", "no-weights", "unsupported-module")
TOO_HIGH_RANK = 64

if TYPE_CHECKING:
    from vllm_runtime.devhub.server import DevHub


def _module_dims(shape: ModelShape, module: str) -> tuple[int, int]:
    """(in_features, out_features) of one projection of the tiny Llama."""
    h = shape.hidden_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    i = shape.intermediate_size
    dims = {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        "input_layernorm": (h, h),  # not a linear layer: only for the unsupported-module variant
    }  # fmt: skip
    return dims[module]


def _module_path(layer: int, module: str) -> str:
    parent = "self_attn" if module in ATTENTION_MODULES else ("mlp" if module.endswith("_proj") else "")
    return f"model.layers.{layer}." + (f"{parent}.{module}" if parent else module)


def adapter_tensors(
    shape: ModelShape, rank: int, modules: tuple[str, ...], seed: int, scale: float = 0.3
) -> dict[str, np.ndarray]:
    """PEFT's tensor names and shapes; A and B both random (B non-zero), float32."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(shape.num_hidden_layers):
        for module in modules:
            fan_in, fan_out = _module_dims(shape, module)
            prefix = f"base_model.model.{_module_path(layer, module)}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * scale).astype(np.float32)
    return tensors


def adapter_config(rank: int, modules: tuple[str, ...], base_model: str, alpha: int | None = None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "modules_to_save": None,
    }


def generate(
    out_dir: str | Path,
    *,
    rank: int = 8,
    seed: int = 1,
    variant: str = "good",
    base_model: str = BASE_REPO,
    shape: ModelShape = DEFAULT_SHAPE,
) -> Path:
    """Write an adapter directory and return its path. Deterministic for a given seed, rank and variant."""
    from safetensors.numpy import save_file

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    modules: tuple[str, ...] = ATTENTION_MODULES
    if variant == "rank-too-high":
        rank = TOO_HIGH_RANK
    elif variant == "other-base":
        shape = replace(shape, hidden_size=2 * shape.hidden_size)
    elif variant == "unsupported-module":
        modules = (*ATTENTION_MODULES, "input_layernorm")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps(adapter_config(rank, modules, base_model), indent=2, sort_keys=True) + "\n"
    )
    (out / "README.md").write_text(f"Tiny LoRA adapter ({variant}, rank {rank}) for {base_model}.\n")
    if variant != "no-weights":
        save_file(adapter_tensors(shape, rank, modules, seed), str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    return out


def publish(
    hub: DevHub,
    repo_id: str,
    work_dir: str | Path,
    *,
    seeds: Sequence[int] = (1,),
    rank: int = 8,
    variant: str = "good",
    base_model: str = BASE_REPO,
) -> list[str]:
    """Publish one commit per seed on ``hub`` (tags v1, v2, ...; main at the last); returns the commits."""
    commits: list[str] = []
    for version, seed in enumerate(seeds, start=1):
        directory = generate(Path(work_dir) / f"{repo_id.replace('/', '--')}-v{version}", rank=rank, seed=seed,
                             variant=variant, base_model=base_model)  # fmt: skip
        if version == 1 and repo_id not in hub.repos:
            commit = hub.add_repo(repo_id, directory)
        else:
            commit = hub.add_commit(repo_id, directory)
        hub.create_tag(repo_id, f"v{version}", commit)
        commits.append(commit)
    return commits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("out_dir")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variant", default="good", choices=VARIANTS)
    parser.add_argument("--base-model", default=BASE_REPO)
    args = parser.parse_args(argv)
    out = generate(args.out_dir, rank=args.rank, seed=args.seed, variant=args.variant, base_model=args.base_model)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
