"""Step 6, autoscaling and routing: the KEDA ScaledObject or autoscaling/v2 HPA (``spec.autoscaling``) and
the InferencePool (``spec.routing.inferencePool``), and what the status says about scaling.

- Each object is a child like the others: built by ``autoscaling`` (the same functions ``render``
  prints), applied when missing or different, deleted when its spec is turned off or the engine
  switches (only the operator's own: named by it and owned by the model -- KEDA's ``keda-hpa-<name>``
  carries the ScaledObject's labels but is KEDA's, owned by the ScaledObject, and is never touched).
- An API the cluster does not serve (``Observed.missing_apis``) or that the operator's watches do not
  carry (``Observed.unwatched_apis``, see ``apis``) is not written: its condition (AutoscalerReady /
  RoutingReady) is False with the reason and the install hint, and the step asks to look again when
  discovery is due (``apis.RECHECK_SECONDS``). Nothing else depends on it: the model keeps serving.
- Nothing is created while the Deployment may not be (image policy, memory plan): the same rule as
  the Service.
- The autoscaler writes ``spec.replicas`` through the VLLMModel's scale subresource; the operator never
  writes it. ``model.replicas`` (spec.replicas within [minReplicas, maxReplicas]; 0 stays 0) goes to
  the Deployment. A change of the Deployment's replicas is a scale event: an Event (ScaledUp /
  ScaledDown) with its reason, and ``status.autoscaling.lastScaleTime``/``lastScaleReason``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import apis, autoscaling, kube, promql
from .. import status as st
from ..config import Config
from .. import builders
from ..diagnose import annotations_of, metadata_of
from ..model import VLLMModel
from .types import JSON, Action, Apply, Delete, Event, Observed, Outcome, is_subset, soonest

HPA_INSTALL_HINT = (
    "the cluster does not serve autoscaling/v2 HorizontalPodAutoscalers (Kubernetes 1.23 and later do); "
    "use spec.autoscaling.engine keda, or upgrade the cluster"
)
_HINTS = {
    kube.SCALEDOBJECTS.plural: autoscaling.KEDA_INSTALL_HINT,
    kube.HPAS.plural: HPA_INSTALL_HINT,
    kube.INFERENCEPOOLS.plural: autoscaling.INFERENCE_POOL_INSTALL_HINT,
}
API_NOT_INSTALLED = "ApiNotInstalled"
API_NOT_WATCHED = "ApiNotWatched"
SCALED_UP, SCALED_DOWN = "ScaledUp", "ScaledDown"


@dataclass(frozen=True, kw_only=True)
class AutoscalingStep(Outcome):
    conditions: tuple[st.Condition, ...]  # AutoscalerReady and/or RoutingReady, only those the spec asks for
    summary: JSON | None  # status.autoscaling (None without spec.autoscaling)


def wanted_apis(model: VLLMModel) -> tuple[kube.Resource, ...]:
    """The optional APIs the spec needs (the engine asks discovery only about these)."""
    wanted: list[kube.Resource] = []
    settings = model.spec.get("autoscaling")
    if settings:
        wanted.append(kube.HPAS if settings.get("engine") == autoscaling.ENGINE_HPA else kube.SCALEDOBJECTS)
    if autoscaling.wants_inference_pool(model):
        wanted.append(kube.INFERENCEPOOLS)
    return tuple(wanted)


def unwanted_conditions(model: VLLMModel) -> frozenset[str]:
    """This step's condition types that the spec does not ask for (to drop from the status)."""
    unwanted = set()
    if not model.spec.get("autoscaling"):
        unwanted.add(st.AUTOSCALER_READY)
    if not autoscaling.wants_inference_pool(model):
        unwanted.add(st.ROUTING_READY)
    return frozenset(unwanted)


def _owned(model: VLLMModel, objects: Mapping[str, JSON], name: str | None = None) -> list[str]:
    """Names of ``objects`` the operator made for ``model``: owned by the model (its uid when known)."""
    names = []
    for obj_name, obj in objects.items():
        if name is not None and obj_name != name:
            continue
        refs = metadata_of(obj).get("ownerReferences") or []
        if any(r.get("kind") == "VLLMModel" and r.get("name") == model.name
               and (model.uid is None or r.get("uid") in (None, model.uid)) for r in refs):  # fmt: skip
            names.append(obj_name)
    return sorted(names)


def _unavailable(resource: kube.Resource, observed: Observed, condition_type: str) -> st.Condition | None:
    what = f"{resource.kind} ({resource.api_version})"
    if resource.plural in observed.missing_apis:
        return st.Condition(condition_type, st.FALSE, API_NOT_INSTALLED,
                            f"the cluster does not serve {what}: {_HINTS[resource.plural]}")  # fmt: skip
    if resource.plural in observed.unwatched_apis:
        return st.Condition(condition_type, st.FALSE, API_NOT_WATCHED,
                            f"{what} was installed after the operator started; in namespaced mode the operator "
                            "discovers APIs at start-up only: restart it (kubectl rollout restart deployment "
                            "of vllm-operator) to manage this model's " + resource.kind)  # fmt: skip
    return None


def _find(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any]:
    return st.find(conditions, type_) or {}


def _autoscaler_health(kind: str, obj: Mapping[str, Any]) -> tuple[bool, str, str]:
    """(healthy, reason, message) as the autoscaler's own status says (no status yet: healthy)."""
    conditions = (obj.get("status") or {}).get("conditions")
    wanted = "Ready" if kind == "ScaledObject" else "ScalingActive"
    cond = _find(conditions, wanted)
    if cond.get("status") == st.FALSE:
        return False, str(cond.get("reason") or f"{wanted}False"), str(cond.get("message") or "")
    return True, str(cond.get("reason") or ""), str(cond.get("message") or "")


def _scale_reason(model: VLLMModel, observed: Observed, settings: autoscaling.Autoscaling | None) -> str:
    """Why spec.replicas is what it is now, from the autoscaler's own status where it says."""
    requested = int(model.spec.get("replicas", 1))
    if settings is None:
        return f"spec.replicas set to {requested} (kubectl scale, an edit or another controller)"
    hpa_name = (autoscaling.hpa_name(model) if settings.engine == autoscaling.ENGINE_HPA
                else f"keda-hpa-{autoscaling.scaled_object_name(model)}")  # fmt: skip
    hpa = observed.hpas.get(hpa_name) or {}
    said = _find((hpa.get("status") or {}).get("conditions"), "AbleToScale").get("message")
    what = (f"{settings.metric} target {settings.target:g} per replica" if settings.query is None
            else f"prometheusQuery threshold {settings.target:g}")  # fmt: skip
    reason = f"the {settings.engine} autoscaler set spec.replicas to {requested} ({what})"
    if said:
        reason += f": {said}"
    if requested != model.replicas:
        reason += f"; kept within minReplicas {settings.min_replicas} and maxReplicas {settings.max_replicas}"
    return reason


WorkloadFor = Callable[[VLLMModel, str], JSON]  # the model's workload (Deployment or StatefulSet) at a commit


def replicas_while_caching(model: VLLMModel, observed: Observed, workload_for: WorkloadFor) -> Apply | None:
    """While a new revision is cached the running workload keeps its commit; it still follows
    ``model.replicas`` (the autoscaler's): the workload as deployed (its revision and commit), applied
    again when ``replicas`` is its only difference -- any other change waits for the new revision's rollout."""
    current = observed.deployment
    if current is None:
        return None
    annotations = annotations_of(current)
    commit, revision = annotations.get(builders.ANNOTATION_COMMIT), annotations.get(builders.ANNOTATION_REVISION)
    if not commit or not revision:
        return None
    as_deployed = dataclasses.replace(model, spec={**model.spec, "revision": revision})
    desired = workload_for(as_deployed, str(commit))
    same_but_replicas = {**current, "spec": {**(current.get("spec") or {}), "replicas": desired["spec"].get("replicas")}}
    if is_subset(desired, current) or not is_subset(desired, same_but_replicas):
        return None
    return Apply(desired, created=False)


def plan_autoscaling(
    model: VLLMModel,
    observed: Observed,
    config: Config,
    *,
    wanted: bool,
    deploying: bool,
    workload_for: WorkloadFor | None = None,
) -> AutoscalingStep:
    """``wanted``: a Deployment exists or is being applied and nothing holds creation (the Service's rule);
    ``deploying``: the Deployment step applies the Deployment at ``model.replicas`` in this reconcile;
    ``workload_for`` (when the Deployment step does not: a new revision is being cached, nothing holds
    creation): builds the workload, for ``replicas_while_caching``."""
    actions: list[Action] = []
    events: list[Event] = []
    if not deploying and workload_for is not None:
        follow = replicas_while_caching(model, observed, workload_for)
        if follow is not None:
            actions.append(follow)
            deploying = True
    conditions: list[st.Condition] = []
    requeue: list[float | None] = []
    try:
        settings = autoscaling.autoscaling_of(model)
    except (promql.UnknownMetricError, KeyError, TypeError, ValueError) as exc:
        settings = None
        conditions.append(st.Condition(st.AUTOSCALER_READY, st.FALSE, "InvalidSpec", f"spec.autoscaling: {exc}"))

    # --- the autoscaler ---------------------------------------------------------------------------
    keep: tuple[str, str] | None = None  # (plural, name) of the autoscaler to keep
    if settings is not None:
        resource = kube.HPAS if settings.engine == autoscaling.ENGINE_HPA else kube.SCALEDOBJECTS
        existing = observed.hpas if resource == kube.HPAS else observed.scaled_objects
        name = autoscaling.hpa_name(model) if resource == kube.HPAS else autoscaling.scaled_object_name(model)
        keep = (resource.plural, name)
        unavailable = _unavailable(resource, observed, st.AUTOSCALER_READY)
        if unavailable is not None:
            conditions.append(unavailable)
            requeue.append(apis.RECHECK_SECONDS)
        else:
            try:
                desired = autoscaling.autoscaler_for(model, config)
            except autoscaling.MissingPrometheusAddress as exc:
                desired = None
                conditions.append(st.Condition(st.AUTOSCALER_READY, st.FALSE, "NoPrometheusAddress", str(exc)))
            current = existing.get(name)
            if desired is not None and not wanted:
                conditions.append(st.Condition(st.AUTOSCALER_READY, st.UNKNOWN, "WaitingForDeployment",
                                               f"the {desired['kind']} follows the Deployment"))  # fmt: skip
            elif desired is not None:
                if current is None or not is_subset(desired, current):
                    actions.append(Apply(desired, created=current is None))
                    if current is None:
                        events.append(Event("Normal", "AutoscalerCreated", f"{desired['kind']} {name} scales "
                                            f"VLLMModel {model.name} between {settings.min_replicas} and "
                                            f"{settings.max_replicas} replicas on {settings.metric}"))  # fmt: skip
                healthy, reason, message = _autoscaler_health(desired["kind"], current or {})
                if not healthy:
                    conditions.append(st.Condition(st.AUTOSCALER_READY, st.FALSE, reason,
                                                   f"{desired['kind']} {name}: {message}"))  # fmt: skip
                else:
                    said = f" ({message})" if message and current is not None else ""
                    conditions.append(st.Condition(
                        st.AUTOSCALER_READY, st.TRUE, "Applied",
                        f"{desired['kind']} {name} scales spec.replicas between {settings.min_replicas} and "
                        f"{settings.max_replicas} on {settings.metric} (target {settings.target:g} per replica)"
                        + said))  # fmt: skip
    why = "spec.autoscaling removed" if settings is None else f"engine is {settings.engine}"
    stale = [Delete(kube.SCALEDOBJECTS, model.namespace, owned, why)
             for owned in _owned(model, observed.scaled_objects, autoscaling.scaled_object_name(model))]
    stale += [Delete(kube.HPAS, model.namespace, owned, why)
              for owned in _owned(model, observed.hpas, autoscaling.hpa_name(model))]  # fmt: skip
    for delete in stale:
        if keep != (delete.resource.plural, delete.name):
            actions.append(delete)
            events.append(Event("Normal", "AutoscalerDeleted", f"{delete.resource.kind} {delete.name} deleted: {why}"))

    # --- the InferencePool ------------------------------------------------------------------------
    pool_name = autoscaling.inference_pool_name(model)
    if autoscaling.wants_inference_pool(model):
        unavailable = _unavailable(kube.INFERENCEPOOLS, observed, st.ROUTING_READY)
        if unavailable is not None:
            conditions.append(unavailable)
            requeue.append(apis.RECHECK_SECONDS)
        else:
            pool = autoscaling.inference_pool_for(model, config)
            assert pool is not None
            current = observed.inference_pools.get(pool_name)
            if not wanted:
                conditions.append(st.Condition(st.ROUTING_READY, st.UNKNOWN, "WaitingForDeployment",
                                               "the InferencePool follows the Deployment"))  # fmt: skip
            else:
                if current is None or not is_subset(pool, current):
                    actions.append(Apply(pool, created=current is None))
                conditions.append(_routing_condition(pool, current))
    else:
        for owned in _owned(model, observed.inference_pools, pool_name):
            actions.append(Delete(kube.INFERENCEPOOLS, model.namespace, owned, "spec.routing.inferencePool off"))

    # --- scale events and status.autoscaling ------------------------------------------------------
    summary = None
    last: Mapping[str, Any] = model.status.get("autoscaling") or {}
    scaled_at, scale_reason = last.get("lastScaleTime"), last.get("lastScaleReason")
    dep = observed.deployment
    if dep is not None and deploying:
        before = int((dep.get("spec") or {}).get("replicas", 1))
        if before != model.replicas:
            scale_reason = _scale_reason(model, observed, settings)
            scaled_at = st.now_iso(observed.now)
            reason = SCALED_UP if model.replicas > before else SCALED_DOWN
            events.append(Event("Normal", reason, f"from {before} to {model.replicas} replicas: {scale_reason}"))
    if settings is not None:
        summary = {
            "engine": settings.engine,
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "desiredReplicas": int(model.spec.get("replicas", 1)),
            "currentReplicas": int(((dep or {}).get("status") or {}).get("replicas") or 0),
        }
        if scaled_at:
            summary["lastScaleTime"] = scaled_at
        if scale_reason:
            summary["lastScaleReason"] = scale_reason
    return AutoscalingStep(
        actions=tuple(actions),
        events=tuple(events),
        requeue_after=soonest(*requeue),
        conditions=tuple(conditions),
        summary=summary,
    )


def _routing_condition(pool: Mapping[str, Any], current: Mapping[str, Any] | None) -> st.Condition:
    name = pool["metadata"]["name"]
    picker = pool["spec"]["endpointPickerRef"]
    for parent in ((current or {}).get("status") or {}).get("parents") or []:
        for cond in parent.get("conditions") or []:
            if cond.get("type") in ("Accepted", "ResolvedRefs") and cond.get("status") == st.FALSE:
                gateway = (parent.get("parentRef") or {}).get("name", "a gateway")
                return st.Condition(st.ROUTING_READY, st.FALSE, str(cond.get("reason") or cond["type"]),
                                    f"InferencePool {name}: {gateway}: {cond.get('message', '')}")  # fmt: skip
    return st.Condition(st.ROUTING_READY, st.TRUE, "Applied",
                        f"InferencePool {name} selects the model's ready pods on port "
                        f"{pool['spec']['targetPorts'][0]['number']}; endpoint picker Service {picker['name']}")  # fmt: skip


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """A Warning when AutoscalerReady or RoutingReady has just turned False (once per transition or reason)."""
    events = []
    for type_ in (st.AUTOSCALER_READY, st.ROUTING_READY):
        before = st.find(old.get("conditions"), type_) or {}
        after = st.find(new.get("conditions"), type_) or {}
        if after.get("status") == st.FALSE and (before.get("status") != st.FALSE
                                                 or before.get("reason") != after.get("reason")):  # fmt: skip
            events.append(Event("Warning", str(after.get("reason")), str(after.get("message"))))
    return events
