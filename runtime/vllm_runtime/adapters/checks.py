"""Read an adapter's facts from its files and check them against the base model before vLLM sees it.

vLLM checks the rank and the target modules when it loads an adapter, but an adapter for another hidden
size may load and fail only when a request uses it (the tensors are copied into the base layers' LoRA
buffers then). Checking shapes here, from the safetensors header alone (no weight is read), keeps such an
adapter away from the engine and gives each failure its own reason and fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_runtime.adapters import errors
from vllm_runtime.planner import arch
from vllm_runtime.planner.sources import ModelSourceError, TensorSpec, read_local_header

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
# vLLM's --max-lora-rank takes only these (config/lora.py MaxLoRARanks, 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterFacts:
    """What the runtime and the planner need from an adapter's files."""

    rank: int  # the largest rank of any module (r, or a larger rank_pattern entry)
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    weights_file: str | None
    tensors: dict[str, TensorSpec] = field(default_factory=dict)  # from the safetensors header only

    def summary(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targetModules": list(self.target_modules),
                "baseModel": self.base_model, "weightsFile": self.weights_file}  # fmt: skip


def read_adapter_config(directory: Path, adapter: str = "") -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise errors.AdapterFilesMissing(
            adapter or str(directory), f"{path} is missing: a PEFT adapter repo has {CONFIG_FILE} at its top level"
        ) from None
    except (OSError, ValueError) as exc:
        raise errors.AdapterInvalidConfig(adapter or str(directory), f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise errors.AdapterInvalidConfig(adapter or str(directory), f"{path} must be a JSON object")
    return data


def rank_of(config: dict[str, Any]) -> int | None:
    """The largest LoRA rank in a PEFT config (``r`` and any ``rank_pattern`` value), None if absent."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ints = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ints) if ints else None


def is_adapter_repo(paths: list[str]) -> bool:
    """A repo is an adapter when its top level has adapter_config.json."""
    return CONFIG_FILE in paths


def read_adapter_facts(directory: Path, adapter: str = "", *, headers: bool = True) -> AdapterFacts:
    """Facts from adapter_config.json and the weights' header; typed errors for what vLLM could not load.

    ``headers=False`` opens no weight file at all (the cache's warm check): ``tensors`` stays empty."""
    who = adapter or str(directory)
    config = read_adapter_config(directory, adapter)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise errors.AdapterInvalidConfig(who, f"peft_type is {config.get('peft_type')!r}: vLLM loads LoRA adapters only")
    rank = rank_of(config)
    if rank is None or rank <= 0:
        raise errors.AdapterInvalidConfig(who, f"{CONFIG_FILE} has no positive integer 'r' (the LoRA rank)")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)  # PEFT also allows a regex string; the tensors tell the modules then
    weights = next((name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise errors.AdapterFilesMissing(
            who, f"{directory} has no {' or '.join(WEIGHT_FILES)}: the adapter repo must contain its weights"
        )
    tensors: dict[str, TensorSpec] = {}
    if headers and weights.endswith(".safetensors"):
        try:
            tensors = read_local_header(directory / weights)
        except (ModelSourceError, OSError, ValueError) as exc:
            raise errors.AdapterFilesMissing(who, f"{weights} is not a readable safetensors file: {exc}") from None
    return AdapterFacts(
        rank=rank, alpha=float(config.get("lora_alpha") or rank), target_modules=tuple(sorted(map(str, targets))),
        base_model=config.get("base_model_name_or_path"), weights_file=weights, tensors=tensors,
    )  # fmt: skip


def smallest_vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def linear_dims(base_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the base model's LoRA-able projections, by module name (Llama family
    names; models with other names get rank and module checks from vLLM itself)."""
    cfg = arch.text_config(base_config)
    h = int(arch.first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(arch.first(cfg, "num_attention_heads", "n_head", default=1))
    kv_heads = int(arch.first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(arch.first(cfg, "head_dim", default=0) or (h // max(1, heads)))
    inter = int(arch.first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h))
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }  # fmt: skip


def base_modules(base_tensors: dict[str, TensorSpec]) -> set[str]:
    """Module names (last path element) of the base model's 2-D weights: what LoRA can wrap."""
    names = {n[: -len(".weight")].rsplit(".", 1)[-1] for n, t in base_tensors.items()
             if n.endswith(".weight") and len(t.shape) == 2}  # fmt: skip
    return names | ({"lm_head"} if "embed_tokens" in names else set())


def check_adapter(
    facts: AdapterFacts,
    *,
    adapter: str,
    max_lora_rank: int,
    base_config: dict[str, Any],
    base_tensors: dict[str, TensorSpec] | None = None,
    served_model: str = "",
) -> None:
    """Raise the typed reason this adapter cannot load into this server; return when it can."""
    if facts.rank > max_lora_rank:
        raise errors.AdapterRankTooHigh(
            adapter,
            f"rank {facts.rank} is above the server's max LoRA rank {max_lora_rank}: set maxLoraRank to at least "
            f"{smallest_vllm_rank(facts.rank) if facts.rank <= VLLM_LORA_RANKS[-1] else facts.rank} "
            "(vLLM restarts with it) or use an adapter of rank <= " + str(max_lora_rank),
        )
    modules: dict[str, list[tuple[str, TensorSpec]]] = {}
    for name, spec in facts.tensors.items():
        stem = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
            if stem.endswith(part):
                module = stem[: -len(part)].rsplit(".", 1)[-1]
                modules.setdefault(module, []).append((part, spec))
    if base_tensors:
        supported = base_modules(base_tensors)
        unsupported = sorted(m for m in modules if m not in supported)
        if unsupported:
            raise errors.AdapterUnsupportedModules(
                adapter,
                f"it targets {', '.join(unsupported)}, which the base model {served_model or ''} has no linear "
                f"layer for LoRA to wrap (LoRA-able: {', '.join(sorted(supported))}): retrain it on those modules",
            )
    dims = linear_dims(base_config)
    hidden = dims["o_proj"][1]
    for module, parts in sorted(modules.items()):
        if module not in dims:
            continue
        fan_in, fan_out = dims[module]
        for part, spec in parts:
            want = fan_in if ".lora_A" in part else fan_out
            got = spec.shape[1] if ".lora_A" in part else spec.shape[0]
            if len(spec.shape) == 2 and got != want:
                raise errors.AdapterBaseMismatch(
                    adapter,
                    f"{module}{part.replace('.weight', '')} has {got} features where the base model has {want} "
                    f"(base hidden size {hidden}): it was trained for another base model "
                    f"({facts.base_model or 'unknown'}); use an adapter trained for {served_model or 'the served base'}",
                )
