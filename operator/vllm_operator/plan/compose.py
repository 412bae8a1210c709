"""``plan_reconcile``: the steps in order, each reading only what the earlier ones returned.

image policy -> memory plan -> cache volume -> cache Job -> Deployment -> Service -> autoscaler and
InferencePool (``autoscaling_step``), then the status
from the steps' conditions. Each step returns its own actions, failures, events and time-based hint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_runtime.units import human_bytes

from .. import builders, kube
from .. import status as st
from ..config import Config
from ..model import VLLMModel
from . import adapters as adapters_step
from . import autoscaling_step, replicas_step
from .autoscaling_step import AutoscalingStep, plan_autoscaling
from .cache_job import CacheStep, plan_cache_job
from .image_policy import check_image
from .job_outcome import read_cache_job
from .memory_step import MemoryStep, plan_memory
from .serving import DeploymentStep, plan_deployment, plan_service
from .types import JSON, Apply, Event, Observed, Outcome, Plan, soonest
from .volume import plan_cache_volume

MANAGED_BY = {"app.kubernetes.io/managed-by": "vllm-operator"}


def plan_reconcile(model: VLLMModel, observed: Observed, config: Config) -> Plan:
    """Decide what to create, update and delete, what the status says, and when to look again. Pure."""
    image = check_image(model, config)
    job = read_cache_job(model, observed)
    memory = plan_memory(model, observed, job)
    create_hold = image.hold or memory.create_hold
    volume = plan_cache_volume(memory.model, observed, config, hold=create_hold)
    cache = plan_cache_job(
        memory.model, observed, config, job,
        claim_uid=volume.claim_uid, ready_for_job=volume.ready_for_job, hold=create_hold,
        needs_job_plan=memory.needs_job_plan, last_status=model.status,
    )  # fmt: skip
    adapters = adapters_step.plan_adapters(
        memory.model, observed, config, claim_uid=volume.claim_uid, ready_for_job=volume.ready_for_job,
        hold=create_hold, last_status=model.status,
    )  # fmt: skip
    deployment = plan_deployment(
        adapters.model, observed, config, commit=cache.commit, claim_uid=volume.claim_uid,
        hold=image.hold or memory.deploy_hold or adapters.deploy_hold,
    )  # fmt: skip
    service = plan_service(
        memory.model, observed, config,
        wanted=(deployment.deploying or observed.deployment is not None) and create_hold is None,
    )  # fmt: skip
    scaling = plan_autoscaling(
        memory.model, observed, config,
        wanted=(deployment.deploying or observed.deployment is not None) and create_hold is None,
        deploying=any(isinstance(a, Apply) and kube.resource_of(a.obj) in (kube.DEPLOYMENTS, kube.STATEFULSETS)
                      for a in deployment.actions),
        workload_for=None if deployment.deploying or create_hold is not None else (
            lambda m, commit: replicas_step.desired_workload(m, observed, config, commit, claim_uid=volume.claim_uid)),
    )  # fmt: skip
    scale_out = replicas_step.plan_replicas(
        memory.model, observed, config, rolled_out=deployment.rolled_out, commit=cache.commit,
        wanted=(deployment.deploying or observed.deployment is not None) and create_hold is None,
    )  # fmt: skip
    steps: list[Outcome] = [image, memory, volume, cache, adapters, deployment, service, scale_out, scaling]
    failures = [f for step in steps for f in step.failures]
    return Plan(
        actions=[a for step in steps for a in step.actions],
        status=replicas_step.with_replicas_status(
            adapters_step.with_adapters_status(
                _status(memory.model, model.status, observed, memory, cache, deployment, scaling, failures),
                adapters, generation=model.generation, now=observed.now,
            ),
            scale_out, memory.model, generation=model.generation, now=observed.now,
        ),  # fmt: skip
        events=[e for step in steps for e in step.events],
        requeue_after=soonest(*(step.requeue_after for step in steps)),
    )


def _status(
    model: VLLMModel,
    last_status: Mapping[str, Any],
    observed: Observed,
    memory: MemoryStep,
    cache: CacheStep,
    deployment: DeploymentStep,
    scaling: AutoscalingStep,
    failures: list[st.Condition],
) -> JSON:
    replicas = model.replicas
    dep_status = (observed.deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0) if observed.deployment is not None else 0
    failed = failures[0] if failures else st.Condition(st.FAILED, st.FALSE, "NoFailure", "")
    # kstatus (Flux) reads Stalled=True as "failed, progress needs a change"; it mirrors Failed.
    stalled = st.Condition(st.STALLED, failed.status, failed.reason, failed.message)
    if failures:
        phase, message = st.FAILED_PHASE, failed.message
    elif not memory.memory.decided:
        phase, message = st.PENDING, memory.memory.message
    elif cache.commit is None:
        phase, message = st.CACHING, cache.condition.message
    elif replicas == 0:
        phase, message = st.IDLE, deployment.condition.message
    elif deployment.rolled_out:
        phase, message = st.READY_PHASE, deployment.condition.message
    else:
        phase, message = st.LOADING, f"rolling out commit {cache.commit}: {ready}/{replicas} ready"
    unwanted = autoscaling_step.unwanted_conditions(model)
    conditions = st.merge_conditions(
        [c for c in last_status.get("conditions") or [] if c.get("type") not in unwanted],
        [cache.condition, deployment.condition, failed, stalled, memory.condition, *scaling.conditions],
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
    if deployment.serving_commit:
        status["resolvedRevision"] = deployment.serving_commit
    if cache.summary:
        status["cache"] = cache.summary
    if observed.deployment is not None or deployment.deploying:
        status["endpoint"] = builders.endpoint_for(model)
    if memory.memory.plan is not None:
        status["plan"] = memory.memory.plan
    if scaling.summary is not None:
        status["autoscaling"] = scaling.summary
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
    events += autoscaling_step.transition_events(old, new)
    events += replicas_step.transition_events(old, new)
    events += adapters_step.transition_events(old, new)
    return events
