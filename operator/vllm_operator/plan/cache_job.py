"""Step 3, the cache Job: cache the spec's revision on the claim, once; learn which commit it is.

One Job per model and revision (``builders.cache_job_name``). It is created once the claim is there
and nothing holds creation; a Job whose pod cannot start, or that failed permanently, is replaced as
soon as the spec it was made from changes (its spec-hash differs); a retryable failure is re-run after
``RETRY_FAILED_CACHE_AFTER``. Jobs of revisions no longer wanted are deleted. Once the Deployment
serves the Job's commit and the status records it, the finished Job gets ``ttlSecondsAfterFinished``:
nothing needs it any more (the Deployment's annotations carry the commit).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_runtime.units import human_bytes

from .. import builders, kube, replicas
from .. import status as st
from ..config import Config
from ..diagnose import annotations_of
from ..lora import ANNOTATION_ADAPTER
from ..memory import plan_digest
from ..model import VLLMModel
from .job_outcome import ABSENT, FAILED, FINISHING, RUNNING, SUCCEEDED, JobOutcome
from .types import JSON, Action, Apply, Delete, Event, Hold, Observed, Outcome

# A failed cache Job with a retryable reason (Hub down, stalled) is re-run after this long.
RETRY_FAILED_CACHE_AFTER = datetime.timedelta(minutes=5)


@dataclass(frozen=True, kw_only=True)
class CacheStep(Outcome):
    commit: str | None  # the spec's revision as cached on the claim: the only commit the Deployment may serve
    summary: JSON | None  # status.cache
    condition: st.Condition  # Cached


def served_commit(model: VLLMModel, observed: Observed, claim_uid: str | None) -> str | None:
    """The commit the Deployment already serves for the spec's model and revision, from this claim.

    A revision that is itself the served commit counts too (pinning ``main`` to its commit caches
    nothing and restarts nothing).
    """
    ann = annotations_of(observed.deployment)
    commit = ann.get(builders.ANNOTATION_COMMIT)
    if observed.deployment is None or not commit or ann.get(builders.ANNOTATION_MODEL) != str(model.spec["model"]):
        return None
    served_from = ann.get(builders.ANNOTATION_CLAIM_UID)
    if claim_uid and served_from and served_from != claim_uid:
        return None  # the PVC was replaced since: the new one is empty
    if ann.get(builders.ANNOTATION_REVISION) == model.revision or commit == model.revision:
        return str(commit)
    return None


def plan_cache_job(
    model: VLLMModel,
    observed: Observed,
    config: Config,
    job: JobOutcome,
    *,
    claim_uid: str | None,
    ready_for_job: bool,
    hold: Hold | None,
    needs_job_plan: bool,
    last_status: Mapping[str, Any],
) -> CacheStep:
    """``needs_job_plan``: only a finished Job whose plan is for the spec's planner inputs counts.
    ``last_status``: the status as last written (what it already records)."""
    repo, rev = str(model.spec["model"]), model.revision
    actions: list[Action] = _unwanted_jobs(model, observed, job.name)
    events: list[Event] = []
    failures: list[st.Condition] = []
    requeue: float | None = None
    desired = builders.cache_job_for(model, config, claim_uid=claim_uid)
    existing_hash = annotations_of(job.job).get(builders.ANNOTATION_SPEC_HASH)
    stale = existing_hash != desired["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
    filled_claim = annotations_of(job.job).get(builders.ANNOTATION_CLAIM_UID)
    commit: str | None = None
    rerunning = False  # the Job is being replaced: nothing of it counts
    if job.job is not None and claim_uid and filled_claim and filled_claim != claim_uid:
        rerunning = True
        moved = _claim_of(job.job) not in (None, model.cache_claim_name)  # cache.sharing changed
        if hold is None and moved:
            actions.append(Delete(kube.JOBS, model.namespace, job.name, f"the cache is now PVC {model.cache_claim_name}"))
            events.append(Event("Normal", "CacheVolumeChanged", f"spec.cache.sharing is now {model.sharing}: caching "
                                f"{repo}@{rev} into PVC {model.cache_claim_name}"))  # fmt: skip
        elif hold is None:
            actions.append(Delete(kube.JOBS, model.namespace, job.name, f"PVC {model.cache_claim_name} was replaced"))
            events.append(Event("Warning", "CacheVolumeReplaced", f"PVC {model.cache_claim_name} was deleted and "
                                f"created again since {repo}@{rev} was cached into it; caching again"))  # fmt: skip
    elif job.state == SUCCEEDED:
        planned_for = annotations_of(job.job).get(builders.ANNOTATION_PLAN_DIGEST)
        if needs_job_plan and planned_for != plan_digest(model):
            # The operator cannot plan and this Job's plan is for other inputs: re-run it (the files are cached).
            rerunning = True
            if hold is None:
                actions.append(Delete(kube.JOBS, model.namespace, job.name, "the spec changed: planning again"))
        else:
            commit = job.commit
            if _no_longer_needed(model, observed, job, claim_uid, last_status) and not stale:
                ttl = builders.cache_job_for(model, config, claim_uid=claim_uid,
                                             ttl_seconds=config.cache_job_ttl_seconds)  # fmt: skip
                actions.append(Apply(ttl, created=False))
    elif job.state == ABSENT:
        commit = served_commit(model, observed, claim_uid) if not needs_job_plan else None
        if commit is None and hold is None and ready_for_job:
            actions.append(Apply(desired, created=True))
            events.append(Event("Normal", "CacheStarted", f"caching {repo}@{rev} into PVC {model.cache_claim_name} "
                                f"(Job {job.name})"))  # fmt: skip
    elif job.state == FAILED and job.failure is not None:
        failures.append(job.failure)
        retry, requeue = failed_job_actions(model, observed, job, stale=stale, hold=hold)
        actions += retry
    elif job.state == RUNNING:
        if job.failure is not None:
            failures.append(job.failure)
            if stale and hold is None:
                actions.append(Delete(kube.JOBS, model.namespace, job.name, "the spec changed since its pod got stuck"))
        requeue = job.recheck_after
    elif job.state == FINISHING:
        requeue = job.recheck_after
    summary = _status_cache(model, observed, job, commit, last_status)
    return CacheStep(
        actions=tuple(actions),
        failures=tuple(failures),
        events=tuple(events),
        requeue_after=requeue,
        commit=commit,
        summary=summary,
        condition=_cached_condition(model, job, commit, summary, hold, failed=job.state == FAILED and not rerunning),
    )


def failed_job_actions(
    model: VLLMModel, observed: Observed, job: JobOutcome, *, stale: bool, hold: Hold | None
) -> tuple[list[Action], float | None]:
    """A failed cache Job: replaced when the spec it was made from changed, re-run after
    ``RETRY_FAILED_CACHE_AFTER`` when its failure is transient; (actions, seconds until the retry is due)."""
    if hold is not None:
        return [], None
    if stale:
        return [Delete(kube.JOBS, model.namespace, job.name, "the spec changed since it failed")], None
    if job.retryable and job.finished_at is not None:
        left = RETRY_FAILED_CACHE_AFTER - (observed.now - job.finished_at)
        if left <= datetime.timedelta(0):
            return [Delete(kube.JOBS, model.namespace, job.name, "retrying a transient failure")], None
        return [], left.total_seconds()
    return [], None


def _claim_of(job: Mapping[str, Any] | None) -> str | None:
    """The claim a cache Job's pod mounts as its cache."""
    for volume in ((((job or {}).get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes") or []:
        if volume.get("name") == "cache":
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            return str(claim) if claim else None
    return None


def _unwanted_jobs(model: VLLMModel, observed: Observed, wanted: str) -> list[Action]:
    """Delete the Jobs of revisions (or models) the spec no longer names: the Deployment's annotations
    carry what it serves, and a Job still running would only compete for the volume's space."""
    actions: list[Action] = []
    for name, other in sorted(observed.jobs.items()):
        ann = annotations_of(other)
        if name == wanted or ANNOTATION_ADAPTER in ann:  # an adapter's Job: plan.adapters decides
            continue
        if replicas.ANNOTATION_PREFETCH in ann:  # a replica's prefetch of a new commit: plan.replicas_step decides
            continue
        was = f"{ann.get(builders.ANNOTATION_MODEL)}@{ann.get(builders.ANNOTATION_REVISION)}"
        why = f"{was} is no longer the spec's {model.spec['model']}@{model.revision}"
        actions.append(Delete(kube.JOBS, model.namespace, name, why))
    return actions


def _no_longer_needed(
    model: VLLMModel, observed: Observed, job: JobOutcome, claim_uid: str | None, last_status: Mapping[str, Any]
) -> bool:
    """A finished Job is needed until the Deployment serves its commit and the status records what it told."""
    if job.job is None or (job.job.get("spec") or {}).get("ttlSecondsAfterFinished") is not None:
        return False
    recorded = (last_status.get("cache") or {}).get("commit") == job.commit
    plan = model.status.get("plan")  # the plan in force (possibly the Job's): status must hold it already
    plan_recorded = plan is None or last_status.get("plan") == plan
    return job.commit is not None and served_commit(model, observed, claim_uid) == job.commit and recorded and (
        plan_recorded
    )


def _status_cache(
    model: VLLMModel, observed: Observed, job: JobOutcome, commit: str | None, last_status: Mapping[str, Any]
) -> JSON | None:
    claim = model.cache_claim_name
    old: Mapping[str, Any] = last_status.get("cache") or {}
    deployed = annotations_of(observed.deployment).get(builders.ANNOTATION_COMMIT) if observed.deployment else None
    summary: JSON | None = None
    if commit is not None and job.state == SUCCEEDED and job.summary:
        s = job.summary
        summary = {
            "commit": commit, "revision": model.revision, "bytes": s.get("bytes"), "files": s.get("files"),
            "verified": s.get("verified"), "completedAt": s.get("completedAt"), "claimName": claim,
            "durationSeconds": s.get("durationSeconds"),
        }  # fmt: skip
    elif old.get("commit") and old.get("commit") in (commit, deployed):
        return dict(old)
    elif commit is not None:
        summary = {"commit": commit, "revision": model.revision, "claimName": claim}
    return {k: v for k, v in summary.items() if v is not None} if summary else None


def _cached_condition(
    model: VLLMModel, job: JobOutcome, commit: str | None, summary: JSON | None, hold: Hold | None, *, failed: bool
) -> st.Condition:
    repo, rev = model.spec["model"], model.revision
    if commit is not None:
        size = ""
        if summary and summary.get("commit") == commit and summary.get("bytes") is not None:
            verified = "verified" if summary.get("verified") else "not verified"
            size = f": {human_bytes(summary['bytes'])} in {summary.get('files')} files, {verified}"
        return st.Condition(st.CACHED, st.TRUE, "Cached", f"{repo}@{rev} is commit {commit}{size}")
    if failed:
        return st.Condition(st.CACHED, st.FALSE, "CacheFailed", f"caching {repo}@{rev} failed; see Failed")
    if job.state == ABSENT and hold is not None:
        return st.Condition(st.CACHED, st.FALSE, hold.reason, f"nothing is cached yet: {hold.why}")
    return st.Condition(st.CACHED, st.FALSE, "Caching", f"caching {repo}@{rev} (Job {job.name})")
