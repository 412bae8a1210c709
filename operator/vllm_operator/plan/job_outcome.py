"""What the cache Job of the spec's revision says, judged from its pod's termination message.

A Job's Failed or Complete condition and its pod's termination message arrive in separate watch
events, in either order. The outcome is judged from the message (the runtime's summary: commit,
reason, the cache Job's memory plan); while the Job has finished but no pod shows a terminated
container yet, the outcome is ``finishing``: no failure is stated (a later read would contradict
it) and the plan asks to look again. Only after ``RESULT_WAIT`` is a finished Job judged from the
Job alone (``CacheSummaryMissing``, the Job's own failure reason).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_runtime import layout
from vllm_runtime import summary as summaries

from .. import builders
from .. import status as st
from ..diagnose import (
    cache_failure,
    finished_at,
    has_terminated_container,
    job_phase,
    pod_start_failure,
    pods_of_job,
    termination_summary,
)
from ..model import VLLMModel
from .types import JSON, Observed

# How long a finished Job may go without a visible termination message before it is judged alone.
RESULT_WAIT = datetime.timedelta(seconds=30)

ABSENT, RUNNING, FINISHING, SUCCEEDED, FAILED = "absent", "running", "finishing", "succeeded", "failed"

# Job failure reasons (its Failed condition) that re-running the same Job would only repeat.
_PERMANENT_JOB_REASONS = {"DeadlineExceeded": "raise VLLM_OPERATOR_CACHE_JOB_DEADLINE_SECONDS or check the "
                          "download speed from the Hub (or the mirror, VLLM_OPERATOR_HF_ENDPOINT)"}  # fmt: skip


@dataclass(frozen=True)
class JobOutcome:
    """The cache Job of the spec's revision, interpreted."""

    name: str
    job: JSON | None
    state: str  # absent | running | finishing | succeeded | failed
    commit: str | None = None  # succeeded: the 40-hex commit now on the volume
    summary: JSON | None = None  # the runtime's summary from the termination message
    # failed: why; running: why its pod cannot start (image, Secret, scheduling) -- None while it is fine.
    failure: st.Condition | None = None
    finished_at: datetime.datetime | None = None
    retryable: bool = False  # failed: worth running again after a while with the same spec
    recheck_after: float | None = None  # seconds until time alone may change this judgement


def read_cache_job(model: VLLMModel, observed: Observed) -> JobOutcome:
    name = builders.cache_job_name(model)
    job = observed.jobs.get(name)
    if job is None:
        return JobOutcome(name, None, ABSENT)
    pods = pods_of_job(job, observed.pods)
    phase = job_phase(job)
    if phase == "running":
        stuck, recheck = pod_start_failure(pods, observed.now)
        return JobOutcome(name, job, RUNNING, summary=termination_summary(pods), failure=stuck, recheck_after=recheck)
    finished = st.parse_time((job.get("status") or {}).get("completionTime")) or finished_at(job)
    result = termination_summary(pods)
    if result is None and not has_terminated_container(pods) and finished is not None:
        left = RESULT_WAIT - (observed.now - finished)
        if left > datetime.timedelta(0):
            return JobOutcome(name, job, FINISHING, finished_at=finished, recheck_after=left.total_seconds())
    if phase == "succeeded":
        return _succeeded(model, name, job, result, finished)
    return _failed(model, name, job, result, finished)


def _succeeded(
    model: VLLMModel, name: str, job: JSON, result: JSON | None, finished: datetime.datetime | None
) -> JobOutcome:
    if result is not None and not result.get("ok"):
        return JobOutcome(name, job, FAILED, summary=result, failure=cache_failure(model, result),
                          finished_at=finished, retryable=_retryable(result))  # fmt: skip
    if result is None:
        if layout.is_commit(model.revision):  # nothing to resolve: the revision is the commit
            return JobOutcome(name, job, SUCCEEDED, commit=model.revision, finished_at=finished)
        failure = st.Condition(
            st.FAILED, st.TRUE, "CacheSummaryMissing",
            f"cache Job {name} succeeded but left no summary in its termination message; "
            f"delete the Job to run it again",
        )  # fmt: skip
        return JobOutcome(name, job, FAILED, failure=failure, finished_at=finished, retryable=True)
    commit = result.get("commit")
    if commit is None and layout.is_commit(model.revision):
        commit = model.revision
    if not isinstance(commit, str) or not layout.is_commit(commit):
        # Never deployed: vLLM would take e.g. "release" as a branch and serve whatever it is today.
        failure = st.Condition(
            st.FAILED, st.TRUE, "InvalidCommit",
            f"cache Job {name} resolved {model.spec['model']}@{model.revision} to {str(commit)[:100]!r}, not a "
            "40-hex commit: the Hub or mirror (VLLM_OPERATOR_HF_ENDPOINT) answered wrongly; fix it, then delete "
            f"the Job (or pin spec.revision to a 40-hex commit)",
        )  # fmt: skip
        return JobOutcome(name, job, FAILED, summary=result, failure=failure, finished_at=finished)
    return JobOutcome(name, job, SUCCEEDED, commit=commit, summary=result, finished_at=finished)


def _failed(
    model: VLLMModel, name: str, job: JSON, result: JSON | None, finished: datetime.datetime | None
) -> JobOutcome:
    if result is not None and not result.get("ok"):
        return JobOutcome(name, job, FAILED, summary=result, failure=cache_failure(model, result),
                          finished_at=finished, retryable=_retryable(result))  # fmt: skip
    conds: list[Mapping[str, Any]] = (job.get("status") or {}).get("conditions") or []
    cond = next((c for c in conds if c.get("type") == "Failed"), {})
    reason = str(cond.get("reason") or "CacheJobFailed")
    advice = _PERMANENT_JOB_REASONS.get(reason, f"see `kubectl logs job/{name}`")
    failure = st.Condition(
        st.FAILED, st.TRUE, reason, f"cache Job {name} failed: {cond.get('message') or 'no summary'}; {advice}"
    )
    return JobOutcome(name, job, FAILED, summary=result, failure=failure, finished_at=finished,
                      retryable=reason not in _PERMANENT_JOB_REASONS)  # fmt: skip


def _retryable(result: Mapping[str, Any]) -> bool:
    return str(result.get("reason")) in summaries.REASONS_RETRYABLE
