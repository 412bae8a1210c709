"""Plan one VLLMModel's reconcile from its actual state: what to apply or delete, and the status. Pure.

Flow: cache PVC -> cache Job for the spec's revision -> the Job pod's termination message gives the
resolved commit and the cache summary -> Deployment pinned to that commit -> Service.

The Deployment only ever points at a commit whose cache Job succeeded: while a new revision is being
cached the old Deployment is left as it is (its pods keep serving); once the Job succeeds the
Deployment is applied with the new commit and Kubernetes rolls it with maxUnavailable 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_runtime import layout
from vllm_runtime import summary as summaries
from vllm_runtime.units import human_bytes

from . import builders, kube
from . import status as st
from .config import Config
from .diagnose import (
    IMAGE_PULL_REASONS,
    annotations_of,
    cache_failure,
    crash_loop_failure,
    finished_at,
    image_pull_failure,
    job_phase,
    metadata_of,
    pods_of_job,
    termination_summary,
    waiting,
)
from .memory import CACHE_JOB, NO_GPU, OPERATOR, MemoryPlan, from_summary, plan_digest
from .model import VLLMModel

JSON = dict[str, Any]

ANNOTATION_SPEC_HASH = builders.ANNOTATION_PREFIX + "spec-hash"
# The planner inputs a cache Job's ``--plan-*`` flags were made from (``memory.plan_digest``).
ANNOTATION_PLAN_DIGEST = builders.ANNOTATION_PREFIX + "plan-digest"
# The uid of the cache PVC a cache Job filled / a Deployment serves from: a PVC deleted and re-created
# by hand comes back empty, and a different uid says so.
ANNOTATION_CLAIM_UID = builders.ANNOTATION_PREFIX + "cache-claim-uid"
# A failed cache Job with a retryable reason (Hub down, stalled) is re-run after this long.
RETRY_FAILED_CACHE_AFTER = datetime.timedelta(minutes=5)
# A cache PVC still Pending after this long is reported (WaitForFirstConsumer binds late, legitimately).
PVC_BIND_GRACE = datetime.timedelta(minutes=3)
MANAGED_BY = {"app.kubernetes.io/managed-by": "vllm-operator"}


@dataclass(frozen=True)
class Observed:
    """The actual state of one VLLMModel's children, as read from the API."""

    now: datetime.datetime
    pvc: JSON | None = None  # the cache claim (own or spec.cache.existingClaim)
    jobs: Mapping[str, JSON] = field(default_factory=dict)  # cache Jobs by name
    pods: Sequence[JSON] = ()  # the model's pods (cache and server)
    deployment: JSON | None = None
    service: JSON | None = None
    memory: MemoryPlan = NO_GPU


@dataclass(frozen=True)
class Apply:
    """Server-side apply ``obj``; ``created`` when it did not exist."""

    obj: JSON
    created: bool

    def __str__(self) -> str:
        return f"apply {self.obj['kind']}/{self.obj['metadata']['name']}"


@dataclass(frozen=True)
class Delete:
    resource: kube.Resource
    namespace: str
    name: str
    why: str

    def __str__(self) -> str:
        return f"delete {self.resource.kind}/{self.name} ({self.why})"


Action = Apply | Delete


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    status: JSON  # the complete desired status
    events: list[Event]  # events of the actions; transition events come from ``transition_events``


@dataclass(frozen=True)
class CacheState:
    """The cache Job of the spec's revision, interpreted."""

    job_name: str
    state: str  # absent | running | succeeded | failed
    commit: str | None = None
    summary: JSON | None = None
    failure: st.Condition | None = None
    finished_at: datetime.datetime | None = None


# --- pure helpers ------------------------------------------------------------------------------------


def is_subset(desired: Any, actual: Any) -> bool:
    """True when every field of ``desired`` has the same value in ``actual`` (extra fields allowed).

    Scalars compare by their text too: the API server returns quantities like ``1`` as ``"1"``.
    """
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(is_subset(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
        )
    return bool(desired == actual or (actual is not None and str(desired) == str(actual)))


def spec_hash(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj.get("spec"), sort_keys=True).encode()).hexdigest()[:16]


def owned(obj: JSON, model: VLLMModel) -> JSON:
    """``obj`` with the model as its controlling owner, so Kubernetes garbage-collects it with the model."""
    meta = obj.setdefault("metadata", {})
    meta["ownerReferences"] = [builders.owner_reference_for(model)]
    return obj


def cache_state(model: VLLMModel, observed: Observed) -> CacheState:
    name = builders.cache_job_name(model)
    job = observed.jobs.get(name)
    if job is None:
        return CacheState(name, "absent")
    pods = pods_of_job(job, observed.pods)
    result = termination_summary(pods)
    phase = job_phase(job)
    finished = st.parse_time((job.get("status") or {}).get("completionTime")) or finished_at(job)
    if phase == "succeeded":
        commit = (result or {}).get("commit") if (result or {}).get("ok") else None
        if not commit and layout.is_commit(model.revision):
            commit = model.revision
        if not commit:
            failure = st.Condition(
                st.FAILED, st.TRUE, "CacheSummaryMissing",
                f"cache Job {name} succeeded but left no summary in its termination message; "
                f"delete the Job to run it again",
            )  # fmt: skip
            return CacheState(name, "failed", summary=result, failure=failure, finished_at=finished)
        return CacheState(name, "succeeded", commit=str(commit), summary=result, finished_at=finished)
    if phase == "failed":
        if result is not None and not result.get("ok"):
            failure = cache_failure(model, result)
        else:
            conds: list[Mapping[str, Any]] = (job.get("status") or {}).get("conditions") or []
            cond = next((c for c in conds if c.get("type") == "Failed"), {})
            failure = st.Condition(
                st.FAILED, st.TRUE, str(cond.get("reason") or "CacheJobFailed"),
                f"cache Job {name} failed: {cond.get('message') or 'no summary'}; see `kubectl logs job/{name}`",
            )  # fmt: skip
        return CacheState(name, "failed", summary=result, failure=failure, finished_at=finished)
    return CacheState(name, "running", summary=result)


def deployed(observed: Observed) -> tuple[str | None, str | None, str | None]:
    """(model, revision, commit) the existing Deployment serves, from its annotations."""
    ann = annotations_of(observed.deployment)
    return (
        ann.get(builders.ANNOTATION_MODEL),
        ann.get(builders.ANNOTATION_REVISION),
        ann.get(builders.ANNOTATION_COMMIT),
    )


def rollout_complete(deployment: Mapping[str, Any] | None, replicas: int) -> bool:
    if deployment is None:
        return False
    status = deployment.get("status") or {}
    generation = metadata_of(deployment).get("generation")
    if generation is not None and (status.get("observedGeneration") or 0) < generation:
        return False
    return (status.get("updatedReplicas") or 0) >= replicas and (status.get("readyReplicas") or 0) >= replicas


# --- the plan ----------------------------------------------------------------------------------------


def effective_memory(model: VLLMModel, observed: Observed, cache: CacheState) -> MemoryPlan:
    """The operator's plan; while it has none (planning, or it cannot plan), the cache Job's, or the one
    already in status -- each only while the planner inputs it was made for are the spec's.

    The plan in status keeps an operator restart (its plans are in memory) from holding a serving model.
    """
    memory = observed.memory
    if not model.spec.get("gpu") or memory.status != st.UNKNOWN:
        return memory
    digest = plan_digest(model)
    job = observed.jobs.get(cache.job_name)
    job_plan = (cache.summary or {}).get("plan") if cache.state == "succeeded" else None
    if isinstance(job_plan, Mapping) and annotations_of(job).get(ANNOTATION_PLAN_DIGEST) == digest:
        return from_summary({**job_plan, "inputsDigest": digest}, CACHE_JOB)
    known: Mapping[str, Any] = model.status.get("plan") or {}
    if known.get("inputsDigest") == digest and known.get("fits") is not None:
        return from_summary(known, str(known.get("source") or OPERATOR))
    return memory


def plan_reconcile(model: VLLMModel, observed: Observed, config: Config) -> Plan:
    """Decide what to create, update and delete, and what the status says. Pure.

    With ``spec.gpu`` nothing is created until the operator's memory planner has decided, and a spec
    that does not fit creates nothing (a serving Deployment of an earlier spec is left as it is).
    """
    actions: list[Action] = []
    events: list[Event] = []
    failures: list[st.Condition] = []
    repo, rev = str(model.spec["model"]), model.revision
    claim = model.cache_claim_name
    cache = cache_state(model, observed)
    memory = effective_memory(model, observed, cache)
    if memory.plan is not None:  # builders read "auto" sizes and the cache size from status.plan
        model = dataclasses.replace(model, status={**model.status, "plan": memory.plan})
    # Hold every child while the plan is being made or when the operator's plan says it cannot fit.
    hold = not memory.decided or observed.memory.does_not_fit
    if memory.does_not_fit:
        failures.append(st.Condition(st.FAILED, st.TRUE, memory.reason, memory.message))
    # Wait for a plan from the cache Job when the operator could not make one.
    need_job_plan = bool(model.spec.get("gpu")) and memory.status == st.UNKNOWN and memory.decided
    claim_uid = metadata_of(observed.pvc).get("uid") if observed.pvc is not None else None

    # 1. The cache PVC (ours), or check the one the spec names.
    if model.owns_cache_pvc and observed.pvc is None:
        pvc = builders.cache_pvc_for(model, config)
        if pvc is not None and not hold:
            if model.cache.get("deletePolicy", "Retain") == "Delete":
                owned(pvc, model)
            actions.append(Apply(pvc, created=True))
    elif model.existing_claim and observed.pvc is None:
        failures.append(
            st.Condition(st.FAILED, st.TRUE, "PVCNotFound",
                         f"PVC {model.existing_claim} (spec.cache.existingClaim) does not exist: create it "
                         "or fix spec.cache.existingClaim")  # fmt: skip
        )
    if observed.pvc is not None and (observed.pvc.get("status") or {}).get("phase") == "Pending":
        created = st.parse_time(metadata_of(observed.pvc).get("creationTimestamp"))
        if created is not None and observed.now - created > PVC_BIND_GRACE:
            failures.append(
                st.Condition(st.FAILED, st.TRUE, "PVCNotBound",
                             f"PVC {claim} is not bound after {int((observed.now - created).total_seconds())}s: "
                             "check spec.cache.storageClassName (the StorageClass must exist and provision "
                             "volumes) or use spec.cache.existingClaim")  # fmt: skip
            )

    # 2. The cache Job of the spec's revision, unless the Deployment already serves that revision.
    dep_model, dep_revision, dep_commit = deployed(observed)
    desired_job = builders.cache_job_for(model, config)
    job_annotations = desired_job["metadata"].setdefault("annotations", {})
    job_annotations[ANNOTATION_SPEC_HASH] = spec_hash(desired_job)
    if builders.cache_plan_flags(model):
        job_annotations[ANNOTATION_PLAN_DIGEST] = plan_digest(model)
    if claim_uid:
        job_annotations[ANNOTATION_CLAIM_UID] = str(claim_uid)
    owned(desired_job, model)
    job = observed.jobs.get(cache.job_name)
    job_claim_uid = annotations_of(job).get(ANNOTATION_CLAIM_UID)
    dep_claim_uid = annotations_of(observed.deployment).get(ANNOTATION_CLAIM_UID)
    cached_commit: str | None = None
    if job is not None and claim_uid and job_claim_uid and job_claim_uid != claim_uid:
        # The PVC was deleted and created again since this Job filled it: the cache is empty now.
        if not hold:
            actions.append(Delete(kube.JOBS, model.namespace, cache.job_name, f"PVC {claim} was replaced"))
            events.append(Event("Warning", "CacheVolumeReplaced", f"PVC {claim} was deleted and created again "
                                f"since {repo}@{rev} was cached into it; caching again"))  # fmt: skip
        cache = CacheState(cache.job_name, "running")  # being re-run: nothing cached yet
    elif cache.state == "succeeded":
        if need_job_plan and annotations_of(job).get(ANNOTATION_PLAN_DIGEST) != plan_digest(model) and not hold:
            # The operator cannot plan and this Job's plan is for other inputs: re-run it (the files are cached).
            actions.append(Delete(kube.JOBS, model.namespace, cache.job_name, "the spec changed: planning again"))
            cache = CacheState(cache.job_name, "running")
        else:
            cached_commit = cache.commit
    elif (
        cache.state == "absent" and dep_commit and dep_model == repo and dep_revision == rev
        and not need_job_plan and (not claim_uid or not dep_claim_uid or dep_claim_uid == claim_uid)
    ):  # fmt: skip
        cached_commit = dep_commit  # cached earlier; the Job has since been cleaned up
    # The Job fills the claim: with a PVC of ours, wait until it is there (its uid goes on the Job).
    claim_ready = claim_uid is not None or not model.owns_cache_pvc
    if hold:
        pass
    elif cached_commit is None and cache.state == "absent":
        if claim_ready:
            actions.append(Apply(desired_job, created=True))
            events.append(Event("Normal", "CacheStarted",
                                f"caching {repo}@{rev} into PVC {claim} (Job {cache.job_name})"))  # fmt: skip
    elif cache.state == "failed" and cache.failure is not None:
        failures.append(cache.failure)
        stale = annotations_of(job).get(ANNOTATION_SPEC_HASH) != spec_hash(desired_job)
        retryable = cache.failure.reason in summaries.REASONS_RETRYABLE or cache.summary is None
        waited = cache.finished_at is not None and observed.now - cache.finished_at > RETRY_FAILED_CACHE_AFTER
        if stale or (retryable and waited):
            why = "the spec changed since it failed" if stale else "retrying a transient failure"
            actions.append(Delete(kube.JOBS, model.namespace, cache.job_name, why))
    elif cache.state == "running" and job is not None:
        pull = waiting(pods_of_job(job, observed.pods), IMAGE_PULL_REASONS)
        if pull is not None:
            failures.append(image_pull_failure(*pull))

    # 3. The Deployment, only ever at a cached commit that fits; 4. the Service in front of it.
    serving_commit = dep_commit if observed.deployment is not None else None
    deployment = observed.deployment
    deploying = cached_commit is not None and not hold and not memory.does_not_fit
    if deploying:
        assert cached_commit is not None
        desired_dep = owned(builders.deployment_for(model, config, cached_commit), model)
        if claim_uid:
            desired_dep["metadata"]["annotations"][ANNOTATION_CLAIM_UID] = str(claim_uid)
        if deployment is None or not is_subset(desired_dep, deployment):
            actions.append(Apply(desired_dep, created=deployment is None))
            if dep_commit != cached_commit or deployment is None:
                events.append(Event("Normal", "Deployed", f"Deployment {desired_dep['metadata']['name']} "
                                    f"now serves {repo} at commit {cached_commit}"))  # fmt: skip
            deployment = None  # being changed: its status says nothing about the new spec yet
        serving_commit = cached_commit
    if (deploying or observed.deployment is not None) and not hold:
        desired_svc = owned(builders.service_for(model, config), model)
        if observed.service is None or not is_subset(desired_svc, observed.service):
            actions.append(Apply(desired_svc, created=observed.service is None))

    server_pods = [p for p in observed.pods if (metadata_of(p).get("labels") or {}).get(
        "app.kubernetes.io/component") == builders.COMPONENT_SERVER]  # fmt: skip
    pull = waiting(server_pods, IMAGE_PULL_REASONS)
    if pull is not None:
        failures.append(image_pull_failure(*pull))
    crash = waiting(server_pods, ["CrashLoopBackOff"])
    if crash is not None:
        failures.append(crash_loop_failure(*crash))

    status = _desired_status(model, observed, memory, cache, cached_commit, serving_commit, deployment, failures)
    return Plan(actions=actions, status=status, events=events)


def plan_actions(model: VLLMModel, observed: Observed, config: Config) -> list[Action]:
    return plan_reconcile(model, observed, config).actions


def _desired_status(
    model: VLLMModel,
    observed: Observed,
    memory: MemoryPlan,
    cache: CacheState,
    cached_commit: str | None,
    serving_commit: str | None,
    deployment: Mapping[str, Any] | None,
    failures: list[st.Condition],
) -> JSON:
    repo, rev = str(model.spec["model"]), model.revision
    claim = model.cache_claim_name
    dep_status = (observed.deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0) if observed.deployment is not None else 0
    replicas = model.replicas

    # Cached
    cache_summary: JSON | None = None
    old_cache = model.status.get("cache") or None
    if cache.state == "succeeded" and cache.summary:
        s = cache.summary
        cache_summary = {
            "commit": cached_commit, "revision": rev, "bytes": s.get("bytes"), "files": s.get("files"),
            "verified": s.get("verified"), "completedAt": s.get("completedAt"), "claimName": claim,
            "durationSeconds": s.get("durationSeconds"),
        }  # fmt: skip
        cache_summary = {k: v for k, v in cache_summary.items() if v is not None}
    elif old_cache and old_cache.get("commit") in (cached_commit, serving_commit):
        cache_summary = dict(old_cache)
    elif cached_commit:
        cache_summary = {"commit": cached_commit, "revision": rev, "claimName": claim}
        cache_summary = {k: v for k, v in cache_summary.items() if v is not None}
    if cached_commit:
        size = ""
        if cache_summary and cache_summary.get("commit") == cached_commit and cache_summary.get("bytes") is not None:
            verified = "verified" if cache_summary.get("verified") else "not verified"
            size = f": {human_bytes(cache_summary['bytes'])} in {cache_summary.get('files')} files, {verified}"
        cached = st.Condition(st.CACHED, st.TRUE, "Cached", f"{repo}@{rev} is commit {cached_commit}{size}")
    elif cache.state == "failed":
        cached = st.Condition(st.CACHED, st.FALSE, "CacheFailed", f"caching {repo}@{rev} failed; see Failed")
    elif cache.state == "absent" and (not memory.decided or memory.does_not_fit):
        why = "the memory plan is being made" if not memory.decided else "the spec does not fit the GPU (see MemoryFits)"
        cached = st.Condition(st.CACHED, st.FALSE, "WaitingForPlan", f"nothing is cached yet: {why}")
    else:
        cached = st.Condition(st.CACHED, st.FALSE, "Caching", f"caching {repo}@{rev} (Job {cache.job_name})")

    # Ready
    endpoint = builders.endpoint_for(model)
    if replicas == 0:
        ready_cond = st.Condition(st.READY, st.FALSE, "ScaledToZero", "spec.replicas is 0")
    elif ready >= 1 and observed.deployment is not None:
        ready_cond = st.Condition(
            st.READY, st.TRUE, "Serving", f"{ready}/{replicas} replicas ready at commit {serving_commit}; {endpoint}"
        )
    elif observed.deployment is None and memory.does_not_fit:
        ready_cond = st.Condition(st.READY, st.FALSE, "NotDeployed", "not deployed: the spec does not fit the GPU")
    elif observed.deployment is not None or cached_commit:
        ready_cond = st.Condition(st.READY, st.FALSE, "Loading", "vLLM is starting: loading weights and compiling")
    else:
        ready_cond = st.Condition(st.READY, st.FALSE, "WaitingForCache", "the Deployment follows the cache Job")

    failed = failures[0] if failures else st.Condition(st.FAILED, st.FALSE, "NoFailure", "")
    memory_fits = st.Condition(st.MEMORY_FITS, memory.status, memory.reason, memory.message)
    # kstatus (Flux) reads Stalled=True as "failed, progress needs a change"; it mirrors Failed.
    stalled = st.Condition(st.STALLED, failed.status, failed.reason, failed.message)

    if failures:
        phase, message = st.FAILED_PHASE, failed.message
    elif not memory.decided:
        phase, message = st.PENDING, memory.message
    elif cached_commit is None:
        phase, message = st.CACHING, cached.message
    elif replicas == 0:
        phase, message = st.PENDING, "scaled to zero"
    elif deployment is not None and serving_commit == cached_commit and rollout_complete(deployment, replicas):
        phase, message = st.READY_PHASE, ready_cond.message
    else:
        phase, message = st.LOADING, f"rolling out commit {cached_commit}: {ready}/{replicas} ready"

    conditions = st.merge_conditions(
        model.status.get("conditions"),
        [cached, ready_cond, failed, stalled, memory_fits],
        generation=model.generation,
        now=observed.now,
    )
    status: JSON = {
        "phase": phase,
        "message": message,
        "conditions": conditions,
        "replicas": int(dep_status.get("replicas") or 0) if observed.deployment is not None else 0,
        "readyReplicas": ready,
        "selector": builders.selector_string(model),
    }
    if model.generation is not None:
        status["observedGeneration"] = model.generation
    if serving_commit:
        status["resolvedRevision"] = serving_commit
    if cache_summary:
        status["cache"] = cache_summary
    if observed.deployment is not None or (cached_commit is not None and not memory.does_not_fit):
        status["endpoint"] = endpoint
    if memory.plan is not None:
        status["plan"] = memory.plan
    return status


def transition_events(model: VLLMModel, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for conditions that have just changed: cache finished, ready, failed."""
    events: list[Event] = []
    old_c, new_c = old.get("conditions") or [], new.get("conditions") or []
    if st.transitioned_to(old_c, new_c, st.CACHED, st.TRUE):
        cache = new.get("cache") or {}
        took = ""
        duration = cache.get("durationSeconds")
        if isinstance(duration, int | float):
            took = f" in {duration:.0f}s"
        size = f", {human_bytes(cache.get('bytes'))} in {cache.get('files')} files" if "bytes" in cache else ""
        events.append(Event("Normal", "CacheFinished",
                            f"cached {model.spec['model']}@{model.revision} = {cache.get('commit')}{size}{took}"))  # fmt: skip
    if st.transitioned_to(old_c, new_c, st.FAILED, st.TRUE):
        cond = st.find(new_c, st.FAILED) or {}
        events.append(Event("Warning", str(cond.get("reason")), str(cond.get("message"))))
    if new.get("phase") == st.READY_PHASE and old.get("phase") != st.READY_PHASE:
        events.append(Event("Normal", "Ready", str(new.get("message"))))
    return events
