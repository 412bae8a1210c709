"""Reconcile one VLLMModel: read the actual state, plan (pure), then act.

Flow: cache PVC -> cache Job for the spec's revision -> the Job pod's termination message gives the
resolved commit and the cache summary -> Deployment pinned to that commit -> Service.

The Deployment only ever points at a commit whose cache Job succeeded: while a new revision is being
cached the old Deployment is left as it is (its pods keep serving); once the Job succeeds the
Deployment is applied with the new commit and Kubernetes rolls it with maxUnavailable 0.

``plan_reconcile`` is pure (unit-tested table by table); ``Reconciler`` does the I/O around it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf
from vllm_runtime import layout
from vllm_runtime import summary as summaries

from . import builders, kube, metrics
from . import status as st
from .config import Config
from .model import VLLMModel

JSON = dict[str, Any]

ANNOTATION_SPEC_HASH = builders.ANNOTATION_PREFIX + "spec-hash"
# A failed cache Job with a retryable reason (Hub down, stalled) is re-run after this long.
RETRY_FAILED_CACHE_AFTER = datetime.timedelta(minutes=5)
# A cache PVC still Pending after this long is reported (WaitForFirstConsumer binds late, legitimately).
PVC_BIND_GRACE = datetime.timedelta(minutes=3)

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
MANAGED_BY = {"app.kubernetes.io/managed-by": "vllm-operator"}

_log = logging.getLogger(__name__)


# --- what the planner sees and decides --------------------------------------------------------------


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


def _meta(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("metadata") or {}


def _annotations(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return _meta(obj).get("annotations") or {}


def owned(obj: JSON, model: VLLMModel) -> JSON:
    """``obj`` with the model as its controlling owner, so Kubernetes garbage-collects it with the model."""
    meta = obj.setdefault("metadata", {})
    meta["ownerReferences"] = [builders.owner_reference_for(model)]
    return obj


def job_phase(job: Mapping[str, Any]) -> str:
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if cond.get("status") == "True" and cond.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    if (status.get("succeeded") or 0) >= 1:
        return "succeeded"
    return "running"


def pods_of_job(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    name, uid = _meta(job).get("name"), _meta(job).get("uid")
    found = []
    for pod in pods:
        labels = _meta(pod).get("labels") or {}
        owners = {ref.get("uid") for ref in _meta(pod).get("ownerReferences") or []}
        if (uid and uid in owners) or labels.get("batch.kubernetes.io/job-name", labels.get("job-name")) == name:
            found.append(pod)
    return sorted(found, key=lambda p: str(_meta(p).get("creationTimestamp") or ""), reverse=True)


def _container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])


def termination_summary(pods: Iterable[Mapping[str, Any]]) -> JSON | None:
    """The newest runtime summary among the pods' terminated containers (current or last state)."""
    for pod in pods:
        for cs in _container_statuses(pod):
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                terminated = state.get("terminated") or {}
                parsed = summaries.parse_termination_message(terminated.get("message"))
                if parsed is not None:
                    return parsed
    return None


def waiting(pods: Iterable[Mapping[str, Any]], reasons: Iterable[str]) -> tuple[Mapping[str, Any], JSON] | None:
    """The first (pod, container status) whose container waits for one of ``reasons``."""
    wanted = set(reasons)
    for pod in pods:
        for cs in _container_statuses(pod):
            wait = (cs.get("state") or {}).get("waiting") or {}
            if wait.get("reason") in wanted:
                return pod, dict(cs)
    return None


def cache_failure(model: VLLMModel, result: Mapping[str, Any]) -> st.Condition:
    """The Failed condition for a failed cache summary, saying what to do."""
    reason = str(result.get("reason") or "CacheFailed")
    detail = str(result.get("message") or "").strip()
    repo, rev = model.spec["model"], model.revision
    advice = {
        "GatedRepo": f"{repo} is gated: accept its terms on the Hub with the token's account and set "
        "spec.hfTokenSecretRef to a Secret holding that token",
        "Unauthorized": f"the Hub refused access to {repo}: set spec.hfTokenSecretRef to a Secret with a valid "
        "token (or check the token the current Secret holds)",
        "RepoNotFound": f"repo {repo} does not exist (or is private): check spec.model; private repos need "
        "spec.hfTokenSecretRef",
        "RevisionNotFound": f"revision {rev!r} does not exist in {repo}: check spec.revision (branch, tag or commit)",
        "InsufficientSpace": "the cache volume is too small for the model: raise spec.cache.size "
        "(or free space on spec.cache.existingClaim)",
        "VerificationFailed": "downloaded files failed sha256 verification: the cache Job will re-download "
        "when re-run; check the storage's health",
        "NoWeights": f"{repo}@{rev} has no weight files vLLM can load: check spec.model",
    }.get(reason)
    message = f"{advice}. {detail}".strip() if advice else (detail or f"the cache Job failed ({reason})")
    return st.Condition(st.FAILED, st.TRUE, reason, message)


def cache_state(model: VLLMModel, observed: Observed) -> CacheState:
    name = builders.cache_job_name(model)
    job = observed.jobs.get(name)
    if job is None:
        return CacheState(name, "absent")
    pods = pods_of_job(job, observed.pods)
    result = termination_summary(pods)
    phase = job_phase(job)
    finished = st.parse_time((job.get("status") or {}).get("completionTime")) or _condition_time(job)
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


def _condition_time(job: Mapping[str, Any]) -> datetime.datetime | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return st.parse_time(cond.get("lastTransitionTime"))
    return None


def deployed(observed: Observed) -> tuple[str | None, str | None, str | None]:
    """(model, revision, commit) the existing Deployment serves, from its annotations."""
    ann = _annotations(observed.deployment)
    return (
        ann.get(builders.ANNOTATION_MODEL),
        ann.get(builders.ANNOTATION_REVISION),
        ann.get(builders.ANNOTATION_COMMIT),
    )


def rollout_complete(deployment: Mapping[str, Any] | None, replicas: int) -> bool:
    if deployment is None:
        return False
    status = deployment.get("status") or {}
    generation = _meta(deployment).get("generation")
    if generation is not None and (status.get("observedGeneration") or 0) < generation:
        return False
    return (status.get("updatedReplicas") or 0) >= replicas and (status.get("readyReplicas") or 0) >= replicas


def human_bytes(n: int | None) -> str:
    if not n:
        return "0 B"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


# --- the plan ----------------------------------------------------------------------------------------


def plan_reconcile(model: VLLMModel, observed: Observed, config: Config) -> Plan:
    """Decide what to create, update and delete, and what the status says. Pure."""
    actions: list[Action] = []
    events: list[Event] = []
    failures: list[st.Condition] = []
    repo, rev = str(model.spec["model"]), model.revision
    claim = model.cache_claim_name

    # 1. The cache PVC (ours), or check the one the spec names.
    if model.owns_cache_pvc and observed.pvc is None:
        pvc = builders.cache_pvc_for(model, config)
        if pvc is not None:
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
        created = st.parse_time(_meta(observed.pvc).get("creationTimestamp"))
        if created is not None and observed.now - created > PVC_BIND_GRACE:
            failures.append(
                st.Condition(st.FAILED, st.TRUE, "PVCNotBound",
                             f"PVC {claim} is not bound after {int((observed.now - created).total_seconds())}s: "
                             "check spec.cache.storageClassName (the StorageClass must exist and provision "
                             "volumes) or use spec.cache.existingClaim")  # fmt: skip
            )

    # 2. The cache Job of the spec's revision, unless the Deployment already serves that revision.
    cache = cache_state(model, observed)
    dep_model, dep_revision, dep_commit = deployed(observed)
    cached_commit: str | None = None
    if cache.state == "succeeded":
        cached_commit = cache.commit
    elif cache.state == "absent" and dep_commit and dep_model == repo and dep_revision == rev:
        cached_commit = dep_commit  # cached earlier; the Job has since been cleaned up
    desired_job = builders.cache_job_for(model, config)
    desired_job["metadata"].setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = spec_hash(desired_job)
    owned(desired_job, model)
    if cached_commit is None and cache.state == "absent":
        actions.append(Apply(desired_job, created=True))
        events.append(Event("Normal", "CacheStarted", f"caching {repo}@{rev} into PVC {claim} (Job {cache.job_name})"))
    elif cache.state == "failed" and cache.failure is not None:
        failures.append(cache.failure)
        job = observed.jobs[cache.job_name]
        stale = _annotations(job).get(ANNOTATION_SPEC_HASH) != spec_hash(desired_job)
        retryable = cache.failure.reason in summaries.REASONS_RETRYABLE or cache.summary is None
        waited = cache.finished_at is not None and observed.now - cache.finished_at > RETRY_FAILED_CACHE_AFTER
        if stale or (retryable and waited):
            why = "the spec changed since it failed" if stale else "retrying a transient failure"
            actions.append(Delete(kube.JOBS, model.namespace, cache.job_name, why))
    elif cache.state == "running":
        job = observed.jobs[cache.job_name]
        pull = waiting(pods_of_job(job, observed.pods), IMAGE_PULL_REASONS)
        if pull is not None:
            failures.append(_image_pull_failure(*pull))

    # 3. The Deployment, only ever at a cached commit; 4. the Service in front of it.
    serving_commit = dep_commit if observed.deployment is not None else None
    deployment = observed.deployment
    if cached_commit is not None:
        desired_dep = owned(builders.deployment_for(model, config, cached_commit), model)
        if deployment is None or not is_subset(desired_dep, deployment):
            actions.append(Apply(desired_dep, created=deployment is None))
            if dep_commit != cached_commit or deployment is None:
                events.append(Event("Normal", "Deployed", f"Deployment {desired_dep['metadata']['name']} "
                                    f"now serves {repo} at commit {cached_commit}"))  # fmt: skip
            deployment = None  # being changed: its status says nothing about the new spec yet
        serving_commit = cached_commit
    if cached_commit is not None or observed.deployment is not None:
        desired_svc = owned(builders.service_for(model, config), model)
        if observed.service is None or not is_subset(desired_svc, observed.service):
            actions.append(Apply(desired_svc, created=observed.service is None))

    server_pods = [p for p in observed.pods if (_meta(p).get("labels") or {}).get(
        "app.kubernetes.io/component") == builders.COMPONENT_SERVER]  # fmt: skip
    pull = waiting(server_pods, IMAGE_PULL_REASONS)
    if pull is not None:
        failures.append(_image_pull_failure(*pull))
    crash = waiting(server_pods, ["CrashLoopBackOff"])
    if crash is not None:
        failures.append(_crash_loop_failure(*crash))

    status = _desired_status(model, observed, cache, cached_commit, serving_commit, deployment, failures)
    return Plan(actions=actions, status=status, events=events)


def plan_actions(model: VLLMModel, observed: Observed, config: Config) -> list[Action]:
    return plan_reconcile(model, observed, config).actions


def _image_pull_failure(pod: Mapping[str, Any], cs: Mapping[str, Any]) -> st.Condition:
    wait = (cs.get("state") or {}).get("waiting") or {}
    return st.Condition(
        st.FAILED, st.TRUE, "ImagePullFailed",
        f"pod {_meta(pod).get('name')} cannot pull image {cs.get('image')!r} ({wait.get('reason')}: "
        f"{wait.get('message') or 'no detail'}); check spec.image (or the operator's "
        "VLLM_OPERATOR_RUNTIME_IMAGE) and spec.imagePullSecrets",
    )  # fmt: skip


def _crash_loop_failure(pod: Mapping[str, Any], cs: Mapping[str, Any]) -> st.Condition:
    last = (cs.get("lastState") or {}).get("terminated") or {}
    result = summaries.parse_termination_message(last.get("message"))
    if result is not None and result.get("message"):
        detail = f"{result.get('reason') or 'error'}: {result['message']}"
    elif last.get("message"):
        detail = str(last["message"]).strip().splitlines()[-1][:500]
    else:
        detail = f"exit code {last.get('exitCode')}; see `kubectl logs --previous {_meta(pod).get('name')}`"
    return st.Condition(
        st.FAILED, st.TRUE, "CrashLoopBackOff",
        f"vLLM keeps crashing in pod {_meta(pod).get('name')} (restarts: {cs.get('restartCount', 0)}): {detail}",
    )  # fmt: skip


def _desired_status(
    model: VLLMModel,
    observed: Observed,
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
    elif observed.deployment is not None or cached_commit:
        ready_cond = st.Condition(st.READY, st.FALSE, "Loading", "vLLM is starting: loading weights and compiling")
    else:
        ready_cond = st.Condition(st.READY, st.FALSE, "WaitingForCache", "the Deployment follows the cache Job")

    failed = failures[0] if failures else st.Condition(st.FAILED, st.FALSE, "NoFailure", "")
    memory = st.Condition(st.MEMORY_FITS, observed.memory.status, observed.memory.reason, observed.memory.message)

    if failures:
        phase, message = st.FAILED_PHASE, failed.message
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
        [cached, ready_cond, failed, memory],
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
    if cached_commit is not None or observed.deployment is not None:
        status["endpoint"] = endpoint
    if observed.memory.plan is not None:
        status["plan"] = observed.memory.plan
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


# --- the memory planner seam -------------------------------------------------------------------------


def _plan_key(model: VLLMModel) -> str:
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


# --- acting ------------------------------------------------------------------------------------------

EventSink = Callable[[Mapping[str, Any], Event], None]


def post_event(body: Mapping[str, Any], event: Event) -> None:
    """Post through kopf's event queue (it batches, retries and never raises into the handler)."""
    obj: Any = dict(body)  # kopf reads only apiVersion, kind and metadata from it
    try:
        kopf.event(obj, type=event.type, reason=event.reason, message=event.message[:1024])
    except LookupError:  # outside kopf's context (no event queue): nothing to post to
        pass


@dataclass
class _ModelState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: bool = False


class Reconciler:
    """Observes, plans and acts for VLLMModels; one reconcile at a time per model."""

    def __init__(
        self,
        client: kube.KubeClient,
        config: Config,
        *,
        planner: Callable[[VLLMModel, Config], Awaitable[MemoryPlan]] = memory_plan,
        events: EventSink = post_event,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
    ) -> None:
        self.client = client
        self.config = config
        self._planner = planner
        self._events = events
        self._clock = clock
        self._models: dict[tuple[str, str], _ModelState] = {}
        self._plans: dict[str, tuple[MemoryPlan, float]] = {}  # plan key -> (plan, when made)
        self._planning: dict[str, asyncio.Task[None]] = {}
        self._retries: dict[tuple[str, str], asyncio.TimerHandle] = {}

    async def observe(self, model: VLLMModel) -> Observed:
        ns, labels = model.namespace, {builders.LABEL_MODEL: model.name, **MANAGED_BY}
        claim = model.cache_claim_name
        pvc, jobs, pods, deployment, service = await asyncio.gather(
            self.client.get(kube.PVCS, ns, claim) if claim else _none(),
            self.client.list(kube.JOBS, ns, labels),
            self.client.list(kube.PODS, ns, labels),
            self.client.get(kube.DEPLOYMENTS, ns, builders.deployment_name(model)),
            self.client.get(kube.SERVICES, ns, builders.service_name(model)),
        )
        memory = self._memory_plan(model)
        return Observed(
            now=self._clock(),
            pvc=pvc,
            jobs={str(j["metadata"]["name"]): j for j in jobs},
            pods=pods,
            deployment=deployment,
            service=service,
            memory=memory,
        )

    def _memory_plan(self, model: VLLMModel) -> MemoryPlan:
        """The model's memory plan if made, else start making it in the background (it never delays caching)."""
        if not model.spec.get("gpu"):
            return NO_GPU
        key = _plan_key(model)
        loop = asyncio.get_running_loop()
        made = self._plans.get(key)
        stale = made is not None and made[0].status == st.UNKNOWN and loop.time() - made[1] > REPLAN_FAILED_AFTER
        if (made is None or stale) and key not in self._planning:
            self._planning[key] = loop.create_task(self._make_plan(key, model))
        return made[0] if made is not None else PLANNING

    async def _make_plan(self, key: str, model: VLLMModel) -> None:
        try:
            self._plans[key] = (await self._planner(model, self.config), asyncio.get_running_loop().time())
        finally:
            self._planning.pop(key, None)
        await self.trigger(model.namespace, model.name, _log)

    async def reconcile(self, namespace: str, name: str, logger: logging.Logger | kopf.Logger) -> str | None:
        """Reconcile one model now; its phase, or None when it is gone.

        Raises kopf.TemporaryError when the API fails in a way worth retrying, kopf.PermanentError for
        a spec that can never work as given.
        """
        state = self._models.setdefault((namespace, name), _ModelState())
        async with state.lock:
            state.pending = False  # from here on, a new event needs a new run
            started = asyncio.get_running_loop().time()
            try:
                phase = await self._reconcile(namespace, name, logger)
            except kopf.TemporaryError:
                metrics.record_reconcile("retry", asyncio.get_running_loop().time() - started)
                raise
            except Exception:
                metrics.record_reconcile("error", asyncio.get_running_loop().time() - started)
                raise
            metrics.record_reconcile("success", asyncio.get_running_loop().time() - started)
            metrics.set_phase(namespace, name, phase)
            return phase

    async def trigger(self, namespace: str, name: str, logger: logging.Logger | kopf.Logger) -> None:
        """Reconcile on a child's or the resync's behalf: coalesced, retried later on failure."""
        state = self._models.setdefault((namespace, name), _ModelState())
        if state.pending:
            return  # a reconcile is already queued; it will read the newest state
        state.pending = True
        try:
            await self.reconcile(namespace, name, logger)
        except kopf.TemporaryError as exc:
            logger.info(f"{namespace}/{name}: {exc}; retrying in {exc.delay}s")
            self._retry_later(namespace, name, logger, float(exc.delay or 10))
        except kopf.PermanentError as exc:
            logger.warning(f"{namespace}/{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a child event must never crash the watcher
            logger.exception(f"{namespace}/{name}: reconcile failed: {exc}")
            self._retry_later(namespace, name, logger, 10.0)

    def _retry_later(self, namespace: str, name: str, logger: logging.Logger | kopf.Logger, delay: float) -> None:
        key = (namespace, name)
        if key in self._retries:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retries.pop(key, None)
            loop.create_task(self.trigger(namespace, name, logger))

        self._retries[key] = loop.call_later(delay, fire)

    def forget(self, namespace: str, name: str) -> None:
        self._models.pop((namespace, name), None)
        handle = self._retries.pop((namespace, name), None)
        if handle is not None:
            handle.cancel()
        metrics.forget(namespace, name)

    def close(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for task in self._planning.values():
            task.cancel()

    async def _reconcile(self, namespace: str, name: str, logger: logging.Logger | kopf.Logger) -> str | None:
        body = await _api(self.client.get(kube.VLLMMODELS, namespace, name))
        if body is None or _meta(body).get("deletionTimestamp"):
            return None  # gone or going: owner references take the children with it
        try:
            model = VLLMModel.from_body(body)
        except ValueError as exc:
            await self._write_status(body, _invalid_spec_status(body, str(exc), self._clock()), logger)
            raise kopf.PermanentError(str(exc)) from exc
        observed = await _api(self.observe(model))
        plan = plan_reconcile(model, observed, self.config)
        for action in plan.actions:
            try:
                await self._act(action)
            except kube.ApiError as exc:
                if exc.retryable:
                    raise kopf.TemporaryError(f"{action}: {exc}", delay=2) from exc
                rejected = _rejected_status(model, plan.status, f"{action}: {exc.message}", self._clock())
                await self._write_status(body, rejected, logger)
                raise kopf.TemporaryError(f"{action}: {exc}", delay=60) from exc
            logger.info(f"{namespace}/{name}: {action}")
        for event in plan.events:
            self._events(body, event)
        await self._write_status(body, plan.status, logger)
        return str(plan.status.get("phase"))

    async def _act(self, action: Action) -> None:
        if isinstance(action, Apply):
            await self.client.apply(action.obj)
        else:
            await self.client.delete(action.resource, action.namespace, action.name)

    async def _write_status(self, body: Mapping[str, Any], new: Mapping[str, Any], logger: Any) -> None:
        old = body.get("status") or {}
        patch = st.status_patch(old, new)
        if not patch:
            return
        meta = _meta(body)
        await _api(self.client.patch_status(kube.VLLMMODELS, str(meta["namespace"]), str(meta["name"]), patch))
        for event in transition_events(VLLMModel.from_body(body), old, new):
            self._events(body, event)


async def _none() -> None:
    return None


async def _api(call: Awaitable[Any]) -> Any:
    """Await an API call; a retryable API failure becomes kopf.TemporaryError."""
    try:
        return await call
    except kube.ApiError as exc:
        if exc.retryable:
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        raise


def _invalid_spec_status(body: Mapping[str, Any], message: str, now: datetime.datetime) -> JSON:
    old = body.get("status") or {}
    generation = _meta(body).get("generation")
    failed = st.Condition(st.FAILED, st.TRUE, "InvalidSpec", message)
    status: JSON = {
        "phase": st.FAILED_PHASE,
        "message": message,
        "conditions": st.merge_conditions(old.get("conditions"), [failed], generation=generation, now=now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _rejected_status(model: VLLMModel, status: Mapping[str, Any], message: str, now: datetime.datetime) -> JSON:
    rejected = dict(status)
    failed = st.Condition(st.FAILED, st.TRUE, "Rejected", f"the API server rejected {message}")
    rejected["conditions"] = st.merge_conditions(
        status.get("conditions"), [failed], generation=model.generation, now=now
    )
    rejected["phase"], rejected["message"] = st.FAILED_PHASE, failed.message
    return rejected
