"""What the children's actual state says: Job outcomes, pod termination messages, waiting reasons.

Pure functions over API objects; each failure becomes a Failed condition that says what to do.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from vllm_runtime import summary as summaries

from . import status as st
from .model import VLLMModel

JSON = dict[str, Any]

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# The kubelet cannot build the container: a Secret or ConfigMap (or a key in it) an env var names is missing.
CONTAINER_CONFIG_REASONS = frozenset({"CreateContainerConfigError"})
# Cluster autoscalers add nodes for an unschedulable pod within minutes: only report it after this long.
UNSCHEDULABLE_GRACE = datetime.timedelta(minutes=2)


def metadata_of(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("metadata") or {}


def annotations_of(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return metadata_of(obj).get("annotations") or {}


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
    name, uid = metadata_of(job).get("name"), metadata_of(job).get("uid")
    found = []
    for pod in pods:
        labels = metadata_of(pod).get("labels") or {}
        owners = {ref.get("uid") for ref in metadata_of(pod).get("ownerReferences") or []}
        if (uid and uid in owners) or labels.get("batch.kubernetes.io/job-name", labels.get("job-name")) == name:
            found.append(pod)
    return sorted(found, key=lambda p: str(metadata_of(p).get("creationTimestamp") or ""), reverse=True)


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


def finished_at(job: Mapping[str, Any]) -> datetime.datetime | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return st.parse_time(cond.get("lastTransitionTime"))
    return None


def image_pull_failure(pod: Mapping[str, Any], cs: Mapping[str, Any]) -> st.Condition:
    wait = (cs.get("state") or {}).get("waiting") or {}
    return st.Condition(
        st.FAILED, st.TRUE, "ImagePullFailed",
        f"pod {metadata_of(pod).get('name')} cannot pull image {cs.get('image')!r} ({wait.get('reason')}: "
        f"{wait.get('message') or 'no detail'}); check spec.image (or the operator's "
        "VLLM_OPERATOR_RUNTIME_IMAGE) and spec.imagePullSecrets",
    )  # fmt: skip


def container_config_failure(pod: Mapping[str, Any], cs: Mapping[str, Any]) -> st.Condition:
    """A container the kubelet cannot create; the kubelet's message names the Secret or key, never a value."""
    wait = (cs.get("state") or {}).get("waiting") or {}
    return st.Condition(
        st.FAILED, st.TRUE, "CreateContainerConfigError",
        f"pod {metadata_of(pod).get('name')} cannot start container {cs.get('name')!r}: "
        f"{wait.get('message') or 'no detail'}; check that the Secret (and key) spec.hfTokenSecretRef names "
        "exists in the model's namespace, and every secretKeyRef/configMapKeyRef of spec.env",
    )  # fmt: skip


def unschedulable(pod: Mapping[str, Any]) -> tuple[datetime.datetime | None, str] | None:
    """(since when, scheduler message) while the pod's PodScheduled condition is False/Unschedulable."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        scheduled = (cond.get("type"), cond.get("status"), cond.get("reason"))
        if scheduled == ("PodScheduled", "False", "Unschedulable"):
            return st.parse_time(cond.get("lastTransitionTime")), str(cond.get("message") or "no detail")
    return None


def unschedulable_failure(pod: Mapping[str, Any], message: str) -> st.Condition:
    return st.Condition(
        st.FAILED, st.TRUE, "Unschedulable",
        f"pod {metadata_of(pod).get('name')} cannot be scheduled: {message}; check spec.nodeSelector, "
        "spec.tolerations, spec.affinity and spec.resources against the cluster's nodes (a ReadWriteOnce cache "
        "volume also ties the pod to the node it is attached to)",
    )  # fmt: skip


def pod_start_failure(
    pods: Iterable[Mapping[str, Any]], now: datetime.datetime
) -> tuple[st.Condition | None, float | None]:
    """Why pods cannot start (image pull, container config, unschedulable for longer than the grace),
    and, while a pod is unschedulable but within the grace, the seconds until it would be reported."""
    pods = list(pods)
    pull = waiting(pods, IMAGE_PULL_REASONS)
    if pull is not None:
        return image_pull_failure(*pull), None
    config_error = waiting(pods, CONTAINER_CONFIG_REASONS)
    if config_error is not None:
        return container_config_failure(*config_error), None
    recheck: float | None = None
    for pod in pods:
        found = unschedulable(pod)
        if found is None:
            continue
        since, message = found
        left = UNSCHEDULABLE_GRACE - (now - since) if since is not None else datetime.timedelta(0)
        if left <= datetime.timedelta(0):
            return unschedulable_failure(pod, message), None
        recheck = left.total_seconds() if recheck is None else min(recheck, left.total_seconds())
    return None, recheck


def has_terminated_container(pods: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any pod reports a terminated container: its termination message, if any, is visible then
    (the kubelet writes the state and the message in the same status update)."""
    for pod in pods:
        for cs in _container_statuses(pod):
            if (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated"):
                return True
    return False


def crash_loop_failure(pod: Mapping[str, Any], cs: Mapping[str, Any]) -> st.Condition:
    last = (cs.get("lastState") or {}).get("terminated") or {}
    result = summaries.parse_termination_message(last.get("message"))
    if result is not None and result.get("message"):
        detail = f"{result.get('reason') or 'error'}: {result['message']}"
    elif last.get("message"):
        detail = str(last["message"]).strip().splitlines()[-1][:500]
    else:
        detail = f"exit code {last.get('exitCode')}; see `kubectl logs --previous {metadata_of(pod).get('name')}`"
    return st.Condition(
        st.FAILED, st.TRUE, "CrashLoopBackOff",
        f"vLLM keeps crashing in pod {metadata_of(pod).get('name')} (restarts: {cs.get('restartCount', 0)}): {detail}",
    )  # fmt: skip
