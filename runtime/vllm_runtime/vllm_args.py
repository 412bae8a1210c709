"""The one mapping from VLLMModel spec fields to vLLM command-line flags.

The operator uses it to write the Deployment's command line; ``vllm-runtime serve`` uses it
to check and interpret the arguments it passes to vLLM. Keep it the only place that knows
vLLM's flag names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# spec field -> vLLM flag, for fields that take a value.
VALUE_FLAGS: dict[str, str] = {
    "quantization": "--quantization",
    "dtype": "--dtype",
    "gpuMemoryUtilization": "--gpu-memory-utilization",
    "maxModelLen": "--max-model-len",
    "tensorParallelSize": "--tensor-parallel-size",
    "loadFormat": "--load-format",
    "seed": "--seed",
    "kvCacheDtype": "--kv-cache-dtype",
    "servedModelName": "--served-model-name",
}
# spec field -> vLLM flag, for booleans (the flag is passed only when true).
BOOL_FLAGS: dict[str, str] = {
    "enforceEager": "--enforce-eager",
    "trustRemoteCode": "--trust-remote-code",
}

# Flags the operator and runtime own: set from dedicated spec fields or by the runtime itself.
# ``spec.extraArgs`` may not contain them (the CRD's CEL rules and ``check_extra_args`` refuse them).
OWNED_FLAGS: frozenset[str] = frozenset(
    {
        "--model",
        "--revision",
        "--tokenizer-revision",
        "--code-revision",
        "--download-dir",
        "--host",
        "--port",
        *VALUE_FLAGS.values(),
        *BOOL_FLAGS.values(),
    }
)

# vLLM's short aliases of owned flags (``-q awq``, ``-tp 2``); refused in ``spec.extraArgs`` like the long forms.
OWNED_SHORT_FLAGS: dict[str, str] = {"-q": "--quantization", "-tp": "--tensor-parallel-size"}

# Settings that change compiled graphs; only identical values may share a compile cache.
COMPILE_KEY_FIELDS = ("quantization", "dtype", "tensorParallelSize", "kvCacheDtype", "maxModelLen", "enforceEager")


def _flag_name(arg: str) -> str:
    """``--max-model-len=4096`` -> ``--max-model-len``; vLLM also accepts underscores."""
    return arg.split("=", 1)[0].replace("_", "-")


def owned_flags_in(extra_args: Sequence[str]) -> list[str]:
    """The flags in ``extra_args`` that the operator owns (empty when none); short aliases as their long form."""
    owned = []
    for arg in extra_args:
        if arg.startswith("--") and _flag_name(arg) in OWNED_FLAGS:
            owned.append(_flag_name(arg))
        elif not arg.startswith("--") and arg.split("=", 1)[0] in OWNED_SHORT_FLAGS:
            owned.append(OWNED_SHORT_FLAGS[arg.split("=", 1)[0]])
    return owned


def check_extra_args(extra_args: Sequence[str]) -> None:
    """Raise ValueError naming ``spec.extraArgs`` and the field to use instead, if an owned flag is present."""
    bad = owned_flags_in(extra_args)
    if not bad:
        return
    by_flag = {flag: field for field, flag in {**VALUE_FLAGS, **BOOL_FLAGS}.items()}
    hints = []
    for flag in bad:
        field = by_flag.get(flag)
        hints.append(f"{flag} (use spec.{field})" if field else f"{flag} (set by the operator)")
    raise ValueError("spec.extraArgs may not contain flags the operator owns: " + ", ".join(hints))


def vllm_flags(spec: Mapping[str, Any]) -> list[str]:
    """vLLM flags for a VLLMModel spec (camelCase field names), in a stable order.

    ``model`` and ``revision`` are not included: the runtime passes the cached snapshot.
    Fields that are absent or None are left to vLLM's defaults; ``extraArgs`` come last.
    """
    flags: list[str] = []
    for field, flag in VALUE_FLAGS.items():
        value = spec.get(field)
        if value is None or (value == "auto" and field in ("maxModelLen", "tensorParallelSize")):
            continue
        flags += [flag, _format(value)]
    for field, flag in BOOL_FLAGS.items():
        if spec.get(field):
            flags.append(flag)
    extra = list(spec.get("extraArgs") or [])
    check_extra_args(extra)
    return flags + extra


def settings_from_flags(flags: Sequence[str]) -> dict[str, Any]:
    """The inverse of ``vllm_flags`` for the mapped fields (extra args are ignored).

    ``vllm-runtime serve`` reads its settings back from the flags it was given, so the
    Deployment's command line stays the single description of what runs.
    """
    by_flag = {flag: field for field, flag in VALUE_FLAGS.items()}
    by_bool = {flag: field for field, flag in BOOL_FLAGS.items()}
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        arg = flags[i]
        name = _flag_name(arg)
        if name in by_bool:
            out[by_bool[name]] = True
        elif name in by_flag:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(flags):
                i += 1
                value = flags[i]
            else:
                raise ValueError(f"vLLM flag {arg} needs a value")
            out[by_flag[name]] = _parse(by_flag[name], value)
        i += 1
    return out


def compile_cache_key(*, vllm_version: str, commit: str, accelerator: str, settings: Mapping[str, Any]) -> str:
    """A directory-safe key: only identical configurations share a torch.compile cache."""
    material = {
        "vllm": vllm_version,
        "commit": commit,
        "accelerator": accelerator,
        **{field: settings.get(field) for field in COMPILE_KEY_FIELDS},
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return f"vllm-{vllm_version}-{digest}".replace("/", "_").replace("+", "_")


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(field: str, value: str) -> Any:
    if field in ("maxModelLen", "tensorParallelSize", "seed"):
        return int(value)
    if field == "gpuMemoryUtilization":
        return float(value)
    return value
