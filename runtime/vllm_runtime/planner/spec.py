"""The VLLMModel spec fields the memory planner reads: as ``plan_model`` keyword arguments (the operator's
own plan) and as ``vllm-runtime cache --plan-*`` flags (the cache Job's plan from the downloaded files).

One place for both, so the operator's plan and the cache Job's plan cannot read the spec differently.
The ``--plan-*`` flag names follow vLLM's flag names (``vllm_args``): ``--plan-max-model-len`` etc.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from .. import vllm_args
from . import gpus

# spec field -> plan_model keyword
PLAN_FIELDS: dict[str, str] = {
    "quantization": "quantization",
    "kvCacheDtype": "kv_cache_dtype",
    "maxModelLen": "max_model_len",
    "tensorParallelSize": "tensor_parallel_size",
    "gpuMemoryUtilization": "gpu_memory_utilization",
    "enforceEager": "enforce_eager",
}
GPU_FLAG = "--plan-gpu"
GPU_MEMORY_FLAG = "--plan-gpu-memory"
_SIZE_FIELDS = ("maxModelLen", "tensorParallelSize")  # an integer or "auto"


def plan_flag(field: str) -> str:
    """``maxModelLen`` -> ``--plan-max-model-len`` (vLLM's flag name with a ``plan-`` prefix)."""
    vllm_flag = {**vllm_args.VALUE_FLAGS, **vllm_args.BOOL_FLAGS}[field]
    return "--plan-" + vllm_flag.removeprefix("--")


def plan_kwargs(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """``plan_model``'s keyword arguments for a spec; None without ``spec.gpu`` (nothing to plan for)."""
    gpu: Mapping[str, Any] = spec.get("gpu") or {}
    if not gpu.get("type") and not gpu.get("memory"):
        return None
    kwargs: dict[str, Any] = {
        "gpu": gpu.get("type") or None,
        "gpu_memory_bytes": None if gpu.get("type") or not gpu.get("memory") else gpus.parse_memory(str(gpu["memory"])),
    }
    for field, kwarg in PLAN_FIELDS.items():
        value = spec.get(field)
        if value is None:
            continue
        if field in _SIZE_FIELDS and value != "auto":
            value = int(value)
        elif field == "gpuMemoryUtilization":
            value = float(value)
        elif field == "enforceEager":
            value = bool(value)
        kwargs[kwarg] = value
    return kwargs


def plan_flags(spec: Mapping[str, Any]) -> list[str]:
    """The ``vllm-runtime cache`` flags that make the cache Job plan ``spec`` too (empty without spec.gpu)."""
    kwargs = plan_kwargs(spec)
    if kwargs is None:
        return []
    flags = [GPU_FLAG, str(kwargs["gpu"])] if kwargs["gpu"] else [GPU_MEMORY_FLAG, str(kwargs["gpu_memory_bytes"])]
    for field, kwarg in PLAN_FIELDS.items():
        if kwarg not in kwargs:
            continue
        if field == "enforceEager":
            flags += [plan_flag(field)] if kwargs[kwarg] else []
        else:
            flags += [plan_flag(field), str(kwargs[kwarg])]
    return flags


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--plan-*`` flags of ``vllm-runtime cache``."""
    group = parser.add_argument_group("memory plan", "also plan GPU memory from the cached files (needs --plan-gpu "
                                      "or --plan-gpu-memory); the plan goes into the summary under 'plan'")  # fmt: skip
    where = group.add_mutually_exclusive_group()
    where.add_argument(GPU_FLAG, dest="plan_gpu", metavar="TYPE", help=f"GPU type: {', '.join(gpus.GPU_TYPES)}")
    where.add_argument(GPU_MEMORY_FLAG, dest="plan_gpu_memory", metavar="SIZE", help="memory of one GPU (bytes, 80GiB)")
    for field, kwarg in PLAN_FIELDS.items():
        if field == "enforceEager":
            group.add_argument(plan_flag(field), dest=f"plan_{kwarg}", action="store_true")
        else:
            group.add_argument(plan_flag(field), dest=f"plan_{kwarg}", metavar="VALUE")


def plan_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The inverse of ``plan_flags``: ``plan_model`` keyword arguments, or None when no GPU was given.

    Raises ValueError naming the flag for a malformed value.
    """
    gpu, memory = getattr(args, "plan_gpu", None), getattr(args, "plan_gpu_memory", None)
    if not gpu and not memory:
        return None
    spec: dict[str, Any] = {"gpu": {"type": gpu} if gpu else {"memory": memory}}
    for field, kwarg in PLAN_FIELDS.items():
        value = getattr(args, f"plan_{kwarg}", None)
        if value is None or value is False:
            continue
        if field in _SIZE_FIELDS and value != "auto" and not str(value).isdigit():
            raise ValueError(f"{plan_flag(field)} must be a positive integer or 'auto', got {value!r}")
        spec[field] = value
    try:
        return plan_kwargs(spec)
    except ValueError as exc:
        raise ValueError(f"the --plan-* flags: {exc}") from None
