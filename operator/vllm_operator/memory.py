"""The memory planner seam: the MemoryFits condition and ``status.plan`` for a VLLMModel.

``vllm_runtime.planner.plan_model`` reads config.json and the safetensors headers (never the weights);
the Reconciler runs it in the background (never blocking the event loop) and creates nothing until it
has decided; a spec that does not fit deploys nothing. When the operator cannot plan (Hub unreachable,
gated model, pvc:// model), the cache Job plans from the files it downloaded and the operator uses that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
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

    @property
    def decided(self) -> bool:
        """False while the operator's planner is still running (nothing may be created yet)."""
        return self.reason != PLANNING.reason

    @property
    def does_not_fit(self) -> bool:
        return self.status == st.FALSE


NO_GPU = MemoryPlan(
    st.UNKNOWN,
    "NoGPUSpecified",
    "set spec.gpu.type (or spec.gpu.memory) to have the memory planner check that the model fits",
)


def plan_key(model: VLLMModel) -> str:
    keys = ("model", "revision", "gpu", "quantization", "kvCacheDtype", "maxModelLen", "tensorParallelSize",
            "gpuMemoryUtilization", "enforceEager")  # fmt: skip
    return json.dumps({k: model.spec.get(k) for k in keys}, sort_keys=True, default=str)


def planning_key(model: VLLMModel) -> str:
    """What the operator's own plan depends on: ``plan_key`` and, with ``spec.adapters``, vLLM's LoRA limits
    (their buffers are allocated at start whatever adapters are loaded). Not in ``plan_digest``: a new
    adapter's rank never re-runs the base model's cache Job."""
    from . import lora  # builds on builders, which builds on this module

    if not lora.enabled(model):
        return plan_key(model)
    return plan_key(model) + json.dumps(lora.limits(model).args())


def lora_spec(model: VLLMModel) -> Any:
    """The planner's ``LoraSpec`` for a model with ``spec.adapters`` (None without)."""
    from vllm_runtime.planner import LoraSpec

    from . import lora

    if not lora.enabled(model):
        return None
    limits = lora.limits(model)
    return LoraSpec(max_loras=limits.max_loras, max_lora_rank=limits.max_lora_rank, max_cpu_loras=limits.max_cpu_loras)


def plan_digest(model: VLLMModel) -> str:
    """A short digest of the planner's inputs: a cache Job's plan is for the spec only while it matches."""
    return hashlib.sha256(plan_key(model).encode()).hexdigest()[:16]


PLANNING = MemoryPlan(
    st.UNKNOWN, "Planning", "the memory planner is reading the model's config and weight headers; nothing is "
    "created until it decides"
)  # fmt: skip
DOES_NOT_FIT = "DoesNotFit"
OPERATOR, CACHE_JOB = "operator", "cacheJob"  # status.plan.source: who made the plan
PLAN_TIMEOUT = 60.0  # seconds; a Hub that does not answer by then makes the plan Unknown (PlanFailed)
REPLAN_FAILED_AFTER = 600.0  # seconds before a plan that could not be made is tried again


async def memory_plan(model: VLLMModel, config: Config) -> MemoryPlan:
    """The MemoryFits condition from ``vllm_runtime.planner.plan_model`` (Unknown when it cannot run).

    It reads config.json and the safetensors headers from the Hub (never weights), in a thread.
    The operator never reads Secrets, so a gated model's plan fails (Unknown) unless a mirror serves it;
    the cache Job then plans from the files it downloaded (``from_summary`` with ``CACHE_JOB``).
    """
    try:
        from vllm_runtime import planner
        from vllm_runtime.planner import spec as plan_spec

        plan_model = planner.plan_model
    except (ImportError, AttributeError):
        return MemoryPlan(st.UNKNOWN, "PlannerUnavailable", "this operator build has no memory planner")
    try:
        kwargs = plan_spec.plan_kwargs(model.spec)
    except ValueError as exc:
        return MemoryPlan(st.UNKNOWN, "PlanFailed", f"spec.gpu: {exc}")
    if kwargs is None:
        return NO_GPU
    if not model.source.is_hub:
        return MemoryPlan(st.UNKNOWN, "NotAHubModel", "the operator cannot read a pvc:// model's files; "
                          "the cache Job plans it")  # fmt: skip

    lora = lora_spec(model)  # with spec.adapters: vLLM's LoRA buffers count against the GPU (refused if too big)
    if lora is not None:
        kwargs = {**kwargs, "lora": lora}

    def _run() -> Any:
        return plan_model(str(model.spec["model"]), revision=model.revision, endpoint=config.hf_endpoint, **kwargs)

    try:
        result = await asyncio.wait_for(asyncio.to_thread(_run), timeout=PLAN_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any planner failure only makes MemoryFits Unknown
        return MemoryPlan(st.UNKNOWN, "PlanFailed", f"the memory planner failed: {type(exc).__name__}: {exc}; "
                          "the cache Job plans from the downloaded files instead"[:1000])  # fmt: skip
    return from_summary({**result.summary(), "inputsDigest": plan_digest(model)}, OPERATOR)


def from_summary(plan: Mapping[str, Any], source: str) -> MemoryPlan:
    """The MemoryFits condition for a ``Plan.summary()`` made by ``source`` (``operator`` or ``cacheJob``)."""
    plan = {**plan, "source": source}
    by = "" if source == OPERATOR else " (planned by the cache Job from the downloaded files)"
    fits = plan.get("fits")
    reason = str(plan.get("reason") or plan.get("error") or "")
    chosen = plan.get("chosen") or {}
    if isinstance(chosen, Mapping) and chosen:
        reason += "; chose " + ", ".join(f"{k}={v}" for k, v in chosen.items())
    if fits is None:
        why = "PlanFailed" if plan.get("error") else "NoVerdict"
        return MemoryPlan(st.UNKNOWN, why, (reason or "the planner gave no verdict") + by, plan)
    if fits:
        return MemoryPlan(st.TRUE, "Fits", (reason or "the model fits the GPU") + by, plan)
    hints = "; ".join(str(x) for x in plan.get("suggestions") or [])
    message = f"{reason or 'the model does not fit'}{by}." + (f" What would fit: {hints}" if hints else "")
    return MemoryPlan(st.FALSE, DOES_NOT_FIT, message, plan)
