"""Step 1, the memory plan: does the spec fit the GPU, and may anything be created yet?

With ``spec.gpu`` nothing is created until the operator's memory planner has decided, and a spec the
operator's plan says cannot fit creates nothing (a serving Deployment of an earlier spec is left as
it is). When the operator cannot plan, the cache Job plans from the files it cached: caching goes
ahead, and only deploying waits for (and obeys) the Job's plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import builders
from .. import status as st
from ..diagnose import annotations_of
from ..memory import CACHE_JOB, OPERATOR, MemoryPlan, from_summary, plan_digest
from ..model import VLLMModel
from .job_outcome import SUCCEEDED, JobOutcome
from .types import Hold, Observed, Outcome

PLANNING_HOLD = Hold("WaitingForPlan", "the memory plan is being made")
DOES_NOT_FIT_HOLD = Hold("WaitingForPlan", "the spec does not fit the GPU (see MemoryFits)")


@dataclass(frozen=True, kw_only=True)
class MemoryStep(Outcome):
    memory: MemoryPlan  # the plan in force (the operator's, the cache Job's, or the one in status)
    model: VLLMModel  # the model with ``status.plan`` = that plan: the builders read "auto" sizes from it
    condition: st.Condition  # MemoryFits
    create_hold: Hold | None  # why nothing may be created yet (planning, or the operator's plan does not fit)
    deploy_hold: Hold | None  # why the Deployment may not be applied (also: the cache Job's plan does not fit)
    needs_job_plan: bool  # the operator could not plan: the spec's cache Job must plan (its digest must match)


def effective_memory(model: VLLMModel, observed: Observed, job: JobOutcome) -> MemoryPlan:
    """The operator's plan; while it has none (planning, or it cannot plan), the cache Job's, or the one
    already in status -- each only while the planner inputs it was made for are the spec's.

    The plan in status keeps an operator restart (its plans are in memory) from holding a serving model.
    """
    memory = observed.memory
    if not model.spec.get("gpu") or memory.status != st.UNKNOWN:
        return memory
    digest = plan_digest(model)
    job_plan = (job.summary or {}).get("plan") if job.state == SUCCEEDED else None
    if isinstance(job_plan, Mapping) and annotations_of(job.job).get(builders.ANNOTATION_PLAN_DIGEST) == digest:
        return from_summary({**job_plan, "inputsDigest": digest}, CACHE_JOB)
    known: Mapping[str, Any] = model.status.get("plan") or {}
    if known.get("inputsDigest") == digest and known.get("fits") is not None:
        return from_summary(known, str(known.get("source") or OPERATOR))
    return memory


def plan_memory(model: VLLMModel, observed: Observed, job: JobOutcome) -> MemoryStep:
    memory = effective_memory(model, observed, job)
    if memory.plan is not None:
        model = dataclasses.replace(model, status={**model.status, "plan": memory.plan})
    failures: tuple[st.Condition, ...] = ()
    if memory.does_not_fit:
        failures = (st.Condition(st.FAILED, st.TRUE, memory.reason, memory.message),)
    create_hold: Hold | None = None
    if not memory.decided:
        create_hold = PLANNING_HOLD
    elif observed.memory.does_not_fit:
        create_hold = DOES_NOT_FIT_HOLD
    return MemoryStep(
        memory=memory,
        model=model,
        condition=st.Condition(st.MEMORY_FITS, memory.status, memory.reason, memory.message),
        failures=failures,
        create_hold=create_hold,
        deploy_hold=create_hold or (DOES_NOT_FIT_HOLD if memory.does_not_fit else None),
        needs_job_plan=bool(model.spec.get("gpu")) and memory.status == st.UNKNOWN and memory.decided,
    )
