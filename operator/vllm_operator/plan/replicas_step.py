"""Scaling out (docs/scaling.md): the workload of the model's cache sharing and how it rolls, the replicas'
own caches, the claims of scaled-down replicas, the disruption budget, and rollouts stuck on scheduling.

- ``desired_workload``: the Deployment (``Shared``) or the StatefulSet (``PerReplica``). A StatefulSet has no
  ``maxSurge``, and its own rolling update would replace a pod before its claim holds the new commit, so the
  roll is driven here through the partition (ordinals at or above it get the new template): a new template is
  applied with the partition at the replica count (``Surge``: plus one extra ordinal, which starts with it);
  each time every pod at or above the partition is updated and ready, and the next pod's claim holds the new
  commit (``prefetched``), the partition moves down one; when all are updated the extra ordinal goes.
  ``Surge``: never fewer ready pods than asked, one spare GPU. ``InPlace``: no extra pod, one at a time.
- ``plan_replicas``: the prefetch Jobs (the new commit into each serving replica's claim, on its node, while it
  serves the old one), the headless Service and NetworkPolicy of a ``PerReplica`` model, the
  PodDisruptionBudget, deleting the workload of the other sharing once the new one has rolled out,
  ``status.replicaCaches`` (from the pods' init-container states), ``status.unusedClaims`` (when each
  scaled-down replica's claim stopped being used; deleted after ``scaledDownRetentionSeconds`` with
  ``deletePolicy: Delete``) and the ``RolloutBlocked`` condition.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_runtime import summary as summaries

from .. import builders, kube, lora, replicas
from .. import status as st
from ..config import Config
from ..diagnose import annotations_of, cache_failure, job_phase, metadata_of, unschedulable
from ..model import VLLMModel
from .types import JSON, Action, Apply, Delete, Event, Observed, Outcome, is_subset

ROLLOUT_BLOCKED = "RolloutBlocked"
# A new pod that stays unschedulable this long is reported (an autoscaler adding a node reports it too; the
# Failed condition waits diagnose.UNSCHEDULABLE_GRACE).
ROLLOUT_BLOCKED_AFTER = datetime.timedelta(seconds=30)
_GPU_SHORT = re.compile(r"Insufficient ([\w./-]*gpu[\w./-]*)", re.IGNORECASE)
_NO_NODE = re.compile(r"didn't match (Pod's )?node (affinity|selector)|node\(s\) didn't match", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class ReplicasStep(Outcome):
    replica_caches: JSON | None  # status.replicaCaches
    unused_claims: list[JSON] | None  # status.unusedClaims
    condition: st.Condition  # RolloutBlocked


# --- the workload ------------------------------------------------------------------------------------


def desired_workload(
    model: VLLMModel, observed: Observed, config: Config, commit: str, *, claim_uid: str | None
) -> JSON:
    if not model.per_replica:
        return builders.deployment_for(model, config, commit, claim_uid=claim_uid)
    current = observed.statefulset
    # Every replica's claim is the size replica 0's got when it was made (the cache Job proved it enough);
    # a StatefulSet's claim template cannot change once created.
    size = replicas.claim_template_size(current) or _requested_storage(observed.pvc)
    wanted = replicas.statefulset_for(model, config, commit, claim_uid=claim_uid, claim_size=size)
    n = model.replicas
    if current is None or n == 0:
        return wanted
    extra = 1 if model.rollout_strategy == "Surge" else 0
    spec: Mapping[str, Any] = current.get("spec") or {}
    status: Mapping[str, Any] = current.get("status") or {}
    running, partition = int(spec.get("replicas") or 0), _partition(current)

    def rolling(count: int, at: int) -> JSON:
        return replicas.statefulset_for(model, config, commit, claim_uid=claim_uid, claim_size=size,
                                        replicas=count, partition=at)  # fmt: skip

    if not is_subset(wanted["spec"]["template"], spec.get("template")):
        if running == 0:
            return wanted
        # A new template: no pod is replaced yet (Surge: the extra ordinal starts with it).
        return rolling(n + extra, n)
    rolling_now = running in (n, n + 1) and (
        partition > 0 or status.get("currentRevision") != status.get("updateRevision"))  # fmt: skip
    if not rolling_now:
        return wanted
    if running != n + extra:  # the strategy changed mid-roll (e.g. to InPlace: no GPU for the extra pod)
        return rolling(n + extra, min(partition, n))
    generation = metadata_of(current).get("generation")
    if generation is not None and int(status.get("observedGeneration") or 0) < int(generation):
        return rolling(running, partition)  # the controller has not seen the last step yet
    updated = _updated_ready_ordinals(model, observed, str(status.get("updateRevision") or ""))
    if not all(i in updated for i in range(partition, running)):
        return rolling(running, partition)  # the pods already replaced are not all serving yet
    if partition > 0:
        if not prefetched(model, observed, commit, partition - 1):
            return rolling(running, partition)  # the next pod keeps serving while its claim gets the commit
        return rolling(running, partition - 1)
    return wanted  # every pod runs the new template: the extra ordinal (if any) goes


def prefetched(model: VLLMModel, observed: Observed, commit: str, ordinal: int) -> bool:
    """Replica ``ordinal`` may be replaced now without a download while it is down: its claim holds
    ``commit`` (replica 0's: the cache Job filled it), its prefetch Job has finished (a failed one is not
    waited for: the replaced pod's init container fetches then), or it has no serving pod to keep."""
    if ordinal == 0:
        return True
    pod = _pod_by_ordinal(model, observed, ordinal)
    if pod is None or not _is_ready(pod) or _pod_commit(pod) == commit:
        return True
    job = observed.jobs.get(replicas.prefetch_job_name(model, ordinal, commit))
    return job is not None and job_phase(job) in ("succeeded", "failed")


def _pod_by_ordinal(model: VLLMModel, observed: Observed, ordinal: int) -> Mapping[str, Any] | None:
    return next((p for p in _server_pods(observed) if _pod_ordinal(model, p) == ordinal), None)


def _pod_commit(pod: Mapping[str, Any]) -> str | None:
    commit = (metadata_of(pod).get("annotations") or {}).get(builders.ANNOTATION_COMMIT)
    return str(commit) if commit else None


def _requested_storage(claim: Mapping[str, Any] | None) -> str | None:
    size = ((((claim or {}).get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    return str(size) if size else None


def _partition(statefulset: Mapping[str, Any]) -> int:
    strategy = ((statefulset.get("spec") or {}).get("updateStrategy") or {}).get("rollingUpdate") or {}
    return int(strategy.get("partition") or 0)


def _pod_ordinal(model: VLLMModel, pod: Mapping[str, Any]) -> int | None:
    name = str(metadata_of(pod).get("name") or "")
    rest = name.removeprefix(replicas.statefulset_name(model) + "-")
    return int(rest) if rest != name and rest.isdigit() else None


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _server_pods(observed: Observed) -> list[Mapping[str, Any]]:
    return [p for p in observed.pods if (metadata_of(p).get("labels") or {}).get(
        "app.kubernetes.io/component") == builders.COMPONENT_SERVER and not metadata_of(p).get("deletionTimestamp")]  # fmt: skip


def _updated_ready_ordinals(model: VLLMModel, observed: Observed, revision: str) -> set[int]:
    found: set[int] = set()
    for pod in _server_pods(observed):
        ordinal = _pod_ordinal(model, pod)
        labels = metadata_of(pod).get("labels") or {}
        if ordinal is not None and revision and labels.get("controller-revision-hash") == revision and _is_ready(pod):
            found.add(ordinal)
    return found


def statefulset_rolled_out(model: VLLMModel, statefulset: Mapping[str, Any] | None) -> bool:
    """Every asked-for pod runs the StatefulSet's newest template and no extra (surge) pod is left."""
    if statefulset is None:
        return False
    status: Mapping[str, Any] = statefulset.get("status") or {}
    spec: Mapping[str, Any] = statefulset.get("spec") or {}
    return (int(spec.get("replicas") or 0) == model.replicas and _partition(statefulset) == 0
            and status.get("currentRevision") == status.get("updateRevision"))  # fmt: skip


# --- the step ----------------------------------------------------------------------------------------


def plan_replicas(
    model: VLLMModel,
    observed: Observed,
    config: Config,
    *,
    wanted: bool,
    rolled_out: bool,
    commit: str | None = None,
) -> ReplicasStep:
    """``wanted``: the workload exists or is being applied and nothing holds creation; ``rolled_out``: the
    workload of the model's sharing serves the cached commit, rollout complete; ``commit``: the cached commit."""
    actions: list[Action] = []
    events: list[Event] = []
    ns = model.namespace
    if model.per_replica:
        prefetch, prefetch_events = _prefetch(model, observed, config, commit if wanted else None)
        actions += prefetch
        events += prefetch_events
    if wanted:
        if model.per_replica:
            actions += _apply(replicas.siblings_service_for(model), observed.siblings_service)
            actions += _apply(replicas.network_policy_for(model), observed.network_policy)
        if replicas.wants_disruption_budget(model):
            actions += _apply(replicas.disruption_budget_for(model), observed.disruption_budget)
    if observed.disruption_budget is not None and not replicas.wants_disruption_budget(model):
        actions.append(Delete(kube.PDBS, ns, model.name, "fewer than 2 replicas, or spec.podDisruptionBudget.enabled false"))
    # A change of sharing: the other workload goes once the new one serves (its pods served meanwhile).
    if rolled_out and model.per_replica and observed.plain_deployment is not None:
        actions.append(Delete(kube.DEPLOYMENTS, ns, builders.deployment_name(model),
                              "the model now runs as a StatefulSet, a cache per replica"))  # fmt: skip
        events.append(Event("Normal", "SharingChanged", f"{model.name} now runs with a cache per replica (StatefulSet "
                            f"{model.name}); the shared claim {model.name}-cache is left as it is"))  # fmt: skip
    if rolled_out and not model.per_replica and observed.statefulset is not None:
        actions.append(Delete(kube.STATEFULSETS, ns, replicas.statefulset_name(model),
                              "the model now runs as a Deployment on one shared claim"))  # fmt: skip
    unused, claim_actions, requeue = _unused_claims(model, observed)
    actions += claim_actions
    condition, blocked_requeue = _rollout_condition(model, observed)
    if requeue is None or (blocked_requeue is not None and blocked_requeue < requeue):
        requeue = blocked_requeue
    return ReplicasStep(
        actions=tuple(actions),
        events=tuple(events),
        failures=_replica_cache_failures(model, observed),
        requeue_after=requeue,
        replica_caches=_replica_caches(model, observed) if model.per_replica else None,
        unused_claims=unused,
        condition=condition,
    )


def _prefetch(
    model: VLLMModel, observed: Observed, config: Config, commit: str | None
) -> tuple[list[Action], list[Event]]:
    """A prefetch Job for each serving replica (ordinal 1 up) whose pod serves another commit than the cached
    one; the prefetch Jobs of any other commit go (a newer revision came, or the model went back)."""
    actions: list[Action] = []
    started: list[int] = []
    for name, job in sorted(observed.jobs.items()):
        ann = annotations_of(job)
        if replicas.ANNOTATION_PREFETCH in ann and ann.get(builders.ANNOTATION_COMMIT) != commit and (
                lora.ANNOTATION_ADAPTER not in ann):  # an adapter's prefetch: plan.adapters decides  # fmt: skip
            actions.append(Delete(kube.JOBS, model.namespace, name, f"prefetch of {ann.get(builders.ANNOTATION_COMMIT)}, "
                                  f"no longer the commit to roll out"))  # fmt: skip
    if commit is None or observed.statefulset is None:
        return actions, []
    for ordinal in range(1, model.replicas):
        pod = _pod_by_ordinal(model, observed, ordinal)
        if pod is None or not _is_ready(pod) or _pod_commit(pod) in (None, commit):
            continue
        if replicas.prefetch_job_name(model, ordinal, commit) not in observed.jobs:
            actions.append(Apply(replicas.prefetch_job_for(model, config, commit, ordinal), created=True))
            started.append(ordinal)
    events = [Event("Normal", "Prefetching", f"fetching commit {commit} into the claims of replicas "
                    f"{', '.join(f'{model.name}-{i}' for i in started)} while they serve the old one")] if started else []  # fmt: skip
    return actions, events


def _apply(desired: JSON, current: JSON | None) -> list[Action]:
    return [] if current is not None and is_subset(desired, current) else [Apply(desired, created=current is None)]


# --- the replicas' caches ----------------------------------------------------------------------------


def _init_state(pod: Mapping[str, Any]) -> tuple[str | None, JSON | None]:
    """(cached | caching | failed | None, the init container's summary) of one replica pod."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if cs.get("name") != replicas.INIT_CACHE_CONTAINER:
            continue
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        terminated = state.get("terminated") or {}
        summary = summaries.parse_termination_message(terminated.get("message") or
                                                      (last.get("terminated") or {}).get("message"))  # fmt: skip
        if terminated:
            return ("cached" if terminated.get("exitCode") == 0 else "failed"), summary
        if state.get("running"):
            return "caching", summary
        if (last.get("terminated") or {}).get("exitCode") not in (None, 0):
            return "failed", summary  # waiting to be restarted after a failure
        return "caching", summary
    return None, None


def _replica_pods(model: VLLMModel, observed: Observed) -> list[Mapping[str, Any]]:
    return [p for p in _server_pods(observed) if _pod_ordinal(model, p) is not None]


def _replica_caches(model: VLLMModel, observed: Observed) -> JSON:
    counts: JSON = {"cached": 0, "caching": 0, "failed": 0}
    hub = sibling = 0
    for pod in _replica_pods(model, observed):
        state, summary = _init_state(pod)
        if state is None:
            continue
        counts[state] += 1
        if state == "cached" and summary:
            hub += int(summary.get("hubBytes") or 0)
            sibling += int(summary.get("siblingBytes") or 0)
    if hub or sibling:
        counts.update(hubBytes=hub, siblingBytes=sibling)
    return counts


def _replica_cache_failures(model: VLLMModel, observed: Observed) -> tuple[st.Condition, ...]:
    if not model.per_replica:
        return ()
    for pod in sorted(_replica_pods(model, observed), key=lambda p: str(metadata_of(p).get("name"))):
        state, summary = _init_state(pod)
        if state == "failed":
            name = metadata_of(pod).get("name")
            if summary is not None and not summary.get("ok"):
                cause = cache_failure(model, summary)
                return (st.Condition(st.FAILED, st.TRUE, cause.reason,
                                     f"replica {name} cannot fill its cache: {cause.message}"),)  # fmt: skip
            return (st.Condition(st.FAILED, st.TRUE, "ReplicaCacheFailed",
                                 f"replica {name} cannot fill its cache (init container {replicas.INIT_CACHE_CONTAINER}"
                                 f" failed); see `kubectl logs {name} -c {replicas.INIT_CACHE_CONTAINER}`"),)  # fmt: skip
    return ()


# --- claims of scaled-down replicas ------------------------------------------------------------------


def _unused_claims(model: VLLMModel, observed: Observed) -> tuple[list[JSON] | None, list[Action], float | None]:
    """Which replica claims no replica uses (ordinal >= the replicas running; replica 0's claim, which the
    cache Job fills, never counts), since when (kept in status: the first reconcile that found it unused),
    and the deletes of those past ``scaledDownRetentionSeconds`` (``deletePolicy: Delete`` only)."""
    if not model.per_replica:
        return None, [], None
    running = model.replicas
    if observed.statefulset is not None:
        running = max(running, int((observed.statefulset.get("spec") or {}).get("replicas") or 0))
    before = {str(e.get("name")): str(e.get("since")) for e in model.status.get("unusedClaims") or []
              if isinstance(e, Mapping)}  # fmt: skip
    unused: list[JSON] = []
    actions: list[Action] = []
    requeue: float | None = None
    keep = datetime.timedelta(seconds=replicas.retention_seconds(model))
    for name, claim in sorted(observed.claims.items()):
        ordinal = replicas.claim_ordinal(model, name)
        if ordinal is None or ordinal == 0 or ordinal < running or metadata_of(claim).get("deletionTimestamp"):
            continue
        since = st.parse_time(before.get(name)) or observed.now
        if replicas.deletes_scaled_down_claims(model):
            left = keep - (observed.now - since)
            if left <= datetime.timedelta(0):
                actions.append(Delete(kube.PVCS, model.namespace, name, f"unused since {st.now_iso(since)}, "
                                      f"longer than spec.cache.scaledDownRetentionSeconds ({int(keep.total_seconds())})"))  # fmt: skip
                continue
            requeue = left.total_seconds() if requeue is None else min(requeue, left.total_seconds())
        unused.append({"name": name, "since": st.now_iso(since)})
    return unused or None, actions, requeue


# --- rollouts that cannot be scheduled -----------------------------------------------------------------


def _rollout_condition(model: VLLMModel, observed: Observed) -> tuple[st.Condition, float | None]:
    recheck: float | None = None
    for pod in _server_pods(observed):
        found = unschedulable(pod)
        if found is None:
            continue
        since, message = found
        left = ROLLOUT_BLOCKED_AFTER - (observed.now - since) if since is not None else datetime.timedelta(0)
        if left > datetime.timedelta(0):
            recheck = left.total_seconds() if recheck is None else min(recheck, left.total_seconds())
            continue
        return _blocked(model, str(metadata_of(pod).get("name")), message), None
    if model.rollout_strategy == "InPlace" and model.replicas == 1:
        return st.Condition(ROLLOUT_BLOCKED, st.FALSE, "InPlaceWithOneReplica",
                            "spec.rollout.strategy InPlace with 1 replica: the model is down while its pod is "
                            "replaced (a new commit or any pod change); use Surge (needs a spare GPU) or 2 replicas "
                            "for no downtime"), recheck  # fmt: skip
    return st.Condition(ROLLOUT_BLOCKED, st.FALSE, "Scheduled", "no model pod is waiting for a node"), recheck


def _blocked(model: VLLMModel, pod: str, message: str) -> st.Condition:
    gpu = _GPU_SHORT.search(message)
    surge = model.rollout_strategy == "Surge"
    if gpu is not None:
        fix = (f"free a {gpu.group(1)} (or add a node with one)"
               + (", or set spec.rollout.strategy InPlace to replace the pods one at a time without an extra GPU"
                  if surge else ""))  # fmt: skip
        return st.Condition(ROLLOUT_BLOCKED, st.TRUE, "InsufficientGPU",
                            f"pod {pod} cannot be scheduled: no node has a free {gpu.group(1)} ({message}); {fix}")  # fmt: skip
    if _NO_NODE.search(message):
        return st.Condition(ROLLOUT_BLOCKED, st.TRUE, "NoMatchingNode",
                            f"pod {pod} cannot be scheduled: no node matches its node selector/affinity ({message}); "
                            "fix spec.nodeSelector/spec.affinity (or label a node to match)")  # fmt: skip
    return st.Condition(ROLLOUT_BLOCKED, st.TRUE, "Unschedulable",
                        f"pod {pod} cannot be scheduled: {message}; check spec.resources, spec.tolerations and the "
                        "nodes' capacity" + (", or set spec.rollout.strategy InPlace (no extra pod)" if surge else ""))  # fmt: skip


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """A Warning when a rollout becomes blocked (or blocked for another reason)."""
    old_c: Sequence[Mapping[str, Any]] = old.get("conditions") or []
    new_c: Sequence[Mapping[str, Any]] = new.get("conditions") or []
    after = st.find(new_c, ROLLOUT_BLOCKED)
    if not after or after.get("status") != st.TRUE:
        return []
    before = st.find(old_c, ROLLOUT_BLOCKED)
    if before and before.get("status") == st.TRUE and before.get("reason") == after.get("reason"):
        return []
    return [Event("Warning", str(after.get("reason")), str(after.get("message")))]


def with_replicas_status(
    status: Mapping[str, Any], step: ReplicasStep, model: VLLMModel, *, generation: int | None, now: datetime.datetime
) -> JSON:
    """``status`` with the sharing in force, the replicas' caches, the unused claims and RolloutBlocked."""
    result = dict(status)
    result["conditions"] = st.merge_conditions(status.get("conditions"), [step.condition], generation=generation,
                                               now=now)  # fmt: skip
    result["sharing"] = model.sharing
    if step.condition.status == st.TRUE and result.get("phase") == st.LOADING:
        result["message"] = f"rollout blocked: {step.condition.message}"  # not an endless "Loading"
    if step.replica_caches is not None:
        result["replicaCaches"] = step.replica_caches
    if step.unused_claims:
        result["unusedClaims"] = step.unused_claims
    return result
