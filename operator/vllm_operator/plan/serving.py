"""Steps 4 and 5, serving: the Deployment, only ever at a cached commit that may be deployed, and the
Service in front of it.

While a new revision is being cached the old Deployment is left as it is (its pods keep serving);
once the new commit is cached the Deployment is applied with it and Kubernetes rolls it with
maxUnavailable 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import builders
from .. import status as st
from ..config import Config
from ..diagnose import annotations_of, crash_loop_failure, metadata_of, pod_start_failure, waiting
from ..model import VLLMModel
from . import replicas_step
from .types import Action, Apply, Event, Hold, Observed, Outcome, is_subset


@dataclass(frozen=True, kw_only=True)
class DeploymentStep(Outcome):
    serving_commit: str | None  # what the model serves (or is rolling out to)
    deploying: bool  # the Deployment is wanted at the cached commit
    rolled_out: bool  # the Deployment is at the cached commit and its rollout is complete
    condition: st.Condition  # Ready


def rollout_complete(deployment: Mapping[str, Any] | None, replicas: int) -> bool:
    if deployment is None:
        return False
    status = deployment.get("status") or {}
    generation = metadata_of(deployment).get("generation")
    if generation is not None and (status.get("observedGeneration") or 0) < generation:
        return False
    return (status.get("updatedReplicas") or 0) >= replicas and (status.get("readyReplicas") or 0) >= replicas


def plan_deployment(
    model: VLLMModel,
    observed: Observed,
    config: Config,
    *,
    commit: str | None,
    claim_uid: str | None,
    hold: Hold | None,
) -> DeploymentStep:
    """``commit``: the spec's revision as cached (None while it is not); ``hold``: why not to deploy now."""
    current = observed.deployment
    deployed = annotations_of(current).get(builders.ANNOTATION_COMMIT) if current is not None else None
    actions: list[Action] = []
    events: list[Event] = []
    deploying = commit is not None and hold is None
    changed = False
    serving = deployed
    if deploying:
        assert commit is not None
        desired = replicas_step.desired_workload(model, observed, config, commit, claim_uid=claim_uid)
        if current is None or not is_subset(desired, current):
            actions.append(Apply(desired, created=current is None))
            changed = True
            if deployed != commit or current is None:
                events.append(Event("Normal", "Deployed", f"{desired['kind']} {desired['metadata']['name']} now serves "
                                    f"{model.spec['model']} at commit {commit}"))  # fmt: skip
        serving = commit
    failures, requeue = _server_pod_failures(observed)
    rolled_out = (
        not changed and current is not None and commit is not None and serving == commit
        and rollout_complete(current, model.replicas)
        and (not model.per_replica or replicas_step.statefulset_rolled_out(model, current))
    )  # fmt: skip
    return DeploymentStep(
        actions=tuple(actions),
        events=tuple(events),
        failures=failures,
        requeue_after=requeue,
        serving_commit=serving,
        deploying=deploying,
        rolled_out=rolled_out,
        condition=_ready_condition(model, observed, serving, commit, hold),
    )


def _server_pod_failures(observed: Observed) -> tuple[tuple[st.Condition, ...], float | None]:
    server_pods = [p for p in observed.pods if (metadata_of(p).get("labels") or {}).get(
        "app.kubernetes.io/component") == builders.COMPONENT_SERVER]  # fmt: skip
    failures: list[st.Condition] = []
    cannot_start, requeue = pod_start_failure(server_pods, observed.now)
    if cannot_start is not None:
        failures.append(cannot_start)
    crash = waiting(server_pods, ["CrashLoopBackOff"])
    if crash is not None:
        failures.append(crash_loop_failure(*crash))
    return tuple(failures), requeue


def _ready_condition(
    model: VLLMModel, observed: Observed, serving: str | None, commit: str | None, hold: Hold | None
) -> st.Condition:
    current = observed.deployment
    ready = int(((current or {}).get("status") or {}).get("readyReplicas") or 0)
    if model.replicas == 0:
        activation = (model.spec.get("autoscaling") or {}).get("activation") or {}
        why = (f"scaled to zero by the autoscaler; it wakes when the activation query exceeds "
               f"{activation.get('threshold') or 0}: {activation['query']}" if activation.get("query")
               else "scaled to zero: spec.replicas is 0 (kubectl scale --replicas=1 to serve)")  # fmt: skip
        return st.Condition(st.READY, st.FALSE, "ScaledToZero", why)
    if ready >= 1 and current is not None:
        return st.Condition(st.READY, st.TRUE, "Serving", f"{ready}/{model.replicas} replicas ready at commit "
                            f"{serving}; {builders.endpoint_for(model)}")  # fmt: skip
    if current is None and hold is not None:
        return st.Condition(st.READY, st.FALSE, "NotDeployed", f"not deployed: {hold.why}")
    if current is not None or commit is not None:
        return st.Condition(st.READY, st.FALSE, "Loading", "vLLM is starting: loading weights and compiling")
    return st.Condition(st.READY, st.FALSE, "WaitingForCache", "the Deployment follows the cache Job")


def plan_service(model: VLLMModel, observed: Observed, config: Config, *, wanted: bool) -> Outcome:
    """``wanted``: a Deployment exists or is being applied, and nothing holds creation."""
    if not wanted:
        return Outcome()
    desired = builders.service_for(model, config)
    if observed.service is not None and is_subset(desired, observed.service):
        return Outcome()
    return Outcome(actions=(Apply(desired, created=observed.service is None),))
