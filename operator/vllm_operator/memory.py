"""The memory planner seam: the MemoryFits condition and ``status.plan`` for a VLLMModel.

``vllm_runtime.planner.plan_model`` reads config.json and the safetensors headers (never the weights);
the Reconciler runs it in the background so it never delays caching.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from . import status as st
from .config import Config
from .model import VLLMModel

JSON = dict[str, Any]


@dataclass(frozen=True)
class MemoryPlan:
    """The MemoryFits condition and ``status.plan`` (None when there is no plan)."""

    status: str
    reason: str
    message: str
    plan: JSON | None = None


NO_GPU = MemoryPlan(
    st.UNKNOWN,
    "NoGPUSpecified",
    "set spec.gpu.type (or spec.gpu.memory) to have the memory planner check that the model fits",
)


def plan_key(model: VLLMModel) -> str:
    keys = ("model", "revision", "gpu", "quantization", "kvCacheDtype", "maxModelLen", "tensorParallelSize",
            "gpuMemoryUtilization")  # fmt: skip
    return json.dumps({k: model.spec.get(k) for k in keys}, sort_keys=True, default=str)


PLANNING = MemoryPlan(st.UNKNOWN, "Planning", "the memory planner is reading the model's config and weight headers")
REPLAN_FAILED_AFTER = 600.0  # seconds before a plan that could not be made is tried again


async def memory_plan(model: VLLMModel, config: Config) -> MemoryPlan:
    """The MemoryFits condition from ``vllm_runtime.planner.plan_model`` (Unknown when it cannot run).

    It reads config.json and the safetensors headers from the Hub (never weights), in a thread.
    The operator never reads Secrets, so a gated model's plan fails (Unknown) unless a mirror serves it.
    """
    gpu = model.spec.get("gpu") or {}
    if not gpu:
        return NO_GPU
    if not model.source.is_hub:
        return MemoryPlan(st.UNKNOWN, "NotAHubModel", "the operator cannot read a pvc:// model's config to plan it")
    try:
        from vllm_runtime import planner

        plan_model = planner.plan_model
    except (ImportError, AttributeError):
        return MemoryPlan(st.UNKNOWN, "PlannerUnavailable", "this operator build has no memory planner")
    spec = model.spec

    def _run() -> Any:
        return plan_model(
            str(spec["model"]), revision=model.revision, gpu=gpu.get("type"),
            gpu_memory_bytes=None if not gpu.get("memory") else _quantity_bytes(str(gpu["memory"])),
            quantization=spec.get("quantization"), kv_cache_dtype=spec.get("kvCacheDtype"),
            max_model_len=spec.get("maxModelLen"), tensor_parallel_size=spec.get("tensorParallelSize", 1),
            gpu_memory_utilization=float(spec.get("gpuMemoryUtilization", 0.9)), endpoint=config.hf_endpoint,
        )  # fmt: skip

    try:
        result = await asyncio.wait_for(asyncio.to_thread(_run), timeout=120)
    except Exception as exc:  # noqa: BLE001 - any planner failure only makes MemoryFits Unknown
        return MemoryPlan(st.UNKNOWN, "PlanFailed", f"the memory planner failed: {type(exc).__name__}: {exc}"[:1000])
    plan = dict(result.summary()) if hasattr(result, "summary") else dict(result.to_dict())
    fits = getattr(result, "fits", plan.get("fits"))
    reason = str(getattr(result, "reason", "") or plan.get("reason") or "")
    if fits is None:
        return MemoryPlan(st.UNKNOWN, "NoVerdict", reason or "the planner gave no verdict", plan)
    if fits:
        return MemoryPlan(st.TRUE, "Fits", reason or "the model fits the GPU", plan)
    hints = "; ".join(str(x) for x in getattr(result, "suggestions", None) or plan.get("suggestions") or [])
    return MemoryPlan(st.FALSE, "DoesNotFit", f"{reason or 'the model does not fit'}. {hints}".strip(), plan)


def _quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}  # fmt: skip
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(float(value))
