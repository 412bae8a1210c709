"""Pure builders for scaling out (docs/scaling.md): a cache per replica, rollout strategy, disruption budget,
spreading over nodes, and the sibling port's NetworkPolicy.

``spec.cache.sharing: PerReplica`` (``VLLMModel.sharing``) runs the model pods as a StatefulSet whose
``volumeClaimTemplates`` give every replica its own ReadWriteOnce claim ``cache-<name>-<ordinal>``, kept
with the replica's identity: a restarted (or rescheduled) pod finds its cache again. Each pod fills its own
claim before vLLM starts: an init container runs ``vllm-runtime cache`` for the pinned commit (a warm volume
is a metadata check only) and takes the bytes from a ready sibling when one is reachable
(``--sibling``, /work/notes/sibling-contract.md); the cache Job still resolves the revision once, into
replica 0's claim (which the operator creates before the StatefulSet, with the name the StatefulSet gives it).

Like ``builders``, every function here returns the complete object the operator applies; ``builders``
calls them, and ``render`` prints what they return.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from . import builders
from .config import Config
from .model import VLLMModel

SIBLING_PORT = 8090  # vllm-runtime serve --sibling-port: the verified cache, read-only (sibling-contract.md)
CLAIM_TEMPLATE = "cache"  # the StatefulSet's claim template: claims are "cache-<name>-<ordinal>"
INIT_CACHE_CONTAINER = "cache"
LABEL_CACHE = builders.ANNOTATION_PREFIX + "cache"  # "per-replica" on every replica's claim
HOSTNAME = "kubernetes.io/hostname"
DEFAULT_SCALED_DOWN_RETENTION_SECONDS = 86400


# --- names -------------------------------------------------------------------------------------------


def statefulset_name(model: VLLMModel) -> str:
    return model.name


def replica_claim_name(model: VLLMModel, ordinal: int) -> str:
    """What the StatefulSet names replica ``ordinal``'s claim: ``<template>-<statefulset>-<ordinal>``."""
    return f"{CLAIM_TEMPLATE}-{statefulset_name(model)}-{ordinal}"


def claim_ordinal(model: VLLMModel, claim: str) -> int | None:
    """The ordinal of one of the model's replica claims, None for any other name."""
    prefix = f"{CLAIM_TEMPLATE}-{statefulset_name(model)}-"
    rest = claim.removeprefix(prefix)
    return int(rest) if rest != claim and rest.isdigit() and str(int(rest)) == rest else None


def siblings_service_name(model: VLLMModel) -> str:
    """The headless Service of the StatefulSet (its ``serviceName``): one DNS name for the ready replicas."""
    return f"{model.name}-siblings"


def sibling_url(model: VLLMModel) -> str:
    """Where a filling replica finds a ready sibling: the headless Service resolves to ready pods only."""
    return f"http://{siblings_service_name(model)}.{model.namespace}.svc:{SIBLING_PORT}"


def retention_seconds(model: VLLMModel) -> int:
    value = model.cache.get("scaledDownRetentionSeconds")
    return DEFAULT_SCALED_DOWN_RETENTION_SECONDS if value is None else int(value)


def deletes_scaled_down_claims(model: VLLMModel) -> bool:
    return str(model.cache.get("deletePolicy", "Retain")) == "Delete"


# --- the replicas' claims ----------------------------------------------------------------------------


def claim_labels(model: VLLMModel) -> dict[str, str]:
    """A replica claim's labels. The StatefulSet controller adds its selector's labels to the claims it makes,
    so the template carries the server pods' labels itself (what the controller would make them anyway)."""
    return {**builders.labels_for(model, builders.COMPONENT_SERVER), LABEL_CACHE: "per-replica"}


def _claim_spec(model: VLLMModel, config: Config, size: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": list(model.cache.get("accessModes") or ["ReadWriteOnce"]),
        "resources": {"requests": {"storage": size or builders.cache_size_for(model, config)}},
    }
    storage_class = model.cache.get("storageClassName") or config.default_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return spec


def _claim_annotations(model: VLLMModel) -> dict[str, str]:
    return {
        builders.ANNOTATION_MODEL: str(model.spec["model"]),
        builders.ANNOTATION_PREFIX + "delete-policy": str(model.cache.get("deletePolicy", "Retain")),
    }


def replica_zero_claim_for(model: VLLMModel, config: Config) -> dict[str, Any]:
    """Replica 0's claim, made by the operator before the StatefulSet exists, so the cache Job can fill it
    (the StatefulSet then uses the claim of that name as its own). Owned by the model only with
    ``deletePolicy: Delete``, as the shared claim is."""
    metadata = builders.child_metadata(model, replica_claim_name(model, 0), builders.COMPONENT_SERVER)
    metadata["labels"] = claim_labels(model)
    metadata["annotations"] = _claim_annotations(model)
    if not deletes_scaled_down_claims(model):
        metadata.pop("ownerReferences", None)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": _claim_spec(model, config)}


# --- the StatefulSet ---------------------------------------------------------------------------------


def init_cache_container(model: VLLMModel, config: Config, commit: str) -> dict[str, Any]:
    """Fills (or checks) this replica's own claim for ``commit`` before vLLM starts: a warm claim is a
    metadata check only; the bytes come from a ready sibling when one answers, else from the Hub; every
    file is verified against the Hub's listing. Its summary is the init container's termination message."""
    job = builders.cache_job_for(model, config, commit)
    container: dict[str, Any] = copy.deepcopy(job["spec"]["template"]["spec"]["containers"][0])
    container["name"] = INIT_CACHE_CONTAINER
    args: list[str] = container["args"]
    plan = builders.cache_plan_flags(model)  # the memory plan is the cache Job's, made once
    if plan and args[-len(plan):] == plan:
        args = args[: -len(plan)]
    container["args"] = [*args, "--sibling", sibling_url(model)]
    container.pop("ports", None)  # the pod's metrics port belongs to the vllm container (same port, later)
    from . import lora  # builds on builders, as this module does

    if lora.enabled(model):  # spec.adapters: the published adapters too, into this replica's claim (the file, not
        # the set, is in the template: a change of the set restarts nothing)
        container["args"] += ["--adapters-file", lora.ADAPTERS_FILE]
        container["volumeMounts"] = [*container["volumeMounts"], *lora.pod_volumes(model)[1][:1]]
    return container


def near_replica_zero(pod_spec: dict[str, Any], model: VLLMModel) -> None:
    """The cache Job fills replica 0's ReadWriteOnce claim, which pod ``<name>-0`` may have attached already
    (a new revision is cached while it serves): prefer that pod's node (soft: before the first start there is
    no such pod; where the scheduler still picks another node, the kubelet reports a Multi-Attach error)."""
    affinity: dict[str, Any] = copy.deepcopy(pod_spec.get("affinity") or {})
    pod_affinity = affinity.setdefault("podAffinity", {})
    pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append({
        "weight": 100,
        "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"statefulset.kubernetes.io/pod-name": f"{statefulset_name(model)}-0"}},
            "topologyKey": HOSTNAME,
        },
    })  # fmt: skip
    pod_spec["affinity"] = affinity


ANNOTATION_PREFETCH = builders.ANNOTATION_PREFIX + "prefetch-ordinal"


def prefetch_job_name(model: VLLMModel, ordinal: int, commit: str) -> str:
    """At most 40 + 3 + 4 + 1 + 8 = 56 characters: a valid label value (the Job's pods carry it)."""
    return f"{model.name[:40]}-pf{ordinal}-{commit[:8]}"


def prefetch_job_for(model: VLLMModel, config: Config, commit: str, ordinal: int) -> dict[str, Any]:
    """Fetch ``commit`` into replica ``ordinal``'s claim while its pod still serves the old commit, so that
    replacing the pod costs only vLLM's start (its init container then finds the commit: a metadata check).

    The cache Job's pod, on claim ``cache-<name>-<ordinal>``, on the node of pod ``<name>-<ordinal>``
    (required pod affinity: the ReadWriteOnce claim is attached there), with ``--sibling`` (replica 0's claim
    got the commit from the cache Job, and its pod's sibling server serves every verified commit on it).
    No memory plan (the cache Job's). Finished Jobs go after ``cache_job_ttl_seconds``."""
    job = builders.cache_job_for(model, config, commit, ttl_seconds=config.cache_job_ttl_seconds)
    metadata = job["metadata"]
    metadata["name"] = prefetch_job_name(model, ordinal, commit)
    annotations = {k: v for k, v in metadata["annotations"].items() if k != builders.ANNOTATION_PLAN_DIGEST}
    annotations[ANNOTATION_PREFETCH] = str(ordinal)
    annotations[builders.ANNOTATION_COMMIT] = commit
    metadata["annotations"] = annotations
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    args: list[str] = container["args"]
    plan = builders.cache_plan_flags(model)
    if plan and args[-len(plan):] == plan:
        args = args[: -len(plan)]
    container["args"] = [*args, "--sibling", sibling_url(model)]
    for volume in pod_spec["volumes"]:
        if volume["name"] == "cache":
            volume["persistentVolumeClaim"] = {"claimName": replica_claim_name(model, ordinal)}
    affinity: dict[str, Any] = copy.deepcopy(model.spec.get("affinity") or {})
    required = affinity.setdefault("podAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", [])
    required.append({
        "labelSelector": {"matchLabels": {"statefulset.kubernetes.io/pod-name": f"{statefulset_name(model)}-{ordinal}"}},
        "topologyKey": HOSTNAME,
    })  # fmt: skip
    pod_spec["affinity"] = affinity
    annotations[builders.ANNOTATION_SPEC_HASH] = builders.spec_hash(job["spec"])
    return job


def topology_spread_for(model: VLLMModel) -> list[dict[str, Any]]:
    """``spec.topologySpreadConstraints`` as given ([] turns spreading off), else a soft spread over nodes."""
    given = model.spec.get("topologySpreadConstraints")
    if given is not None:
        return [dict(c) for c in given]
    return [{
        "maxSkew": 1,
        "topologyKey": HOSTNAME,
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": builders.selector_for(model)},
    }]  # fmt: skip


def wants_spread(model: VLLMModel) -> bool:
    """The default spread applies to models that may run 2 or more pods; PerReplica always (its pod template
    must not change with the replica count: that would restart every replica on a scale)."""
    return model.spec.get("topologySpreadConstraints") is not None or model.per_replica or model.max_replicas >= 2


def statefulset_for(
    model: VLLMModel,
    config: Config,
    commit: str,
    *,
    claim_uid: str | None = None,
    replicas: int | None = None,
    partition: int = 0,
    claim_size: str | None = None,
) -> dict[str, Any]:
    """The model pods as a StatefulSet with a claim per replica (``spec.cache.sharing: PerReplica``).

    The pod template is the Deployment's (``builders.deployment_for``) plus the init container that fills the
    replica's claim, and the sibling port. ``replicas`` and ``partition`` are the rollout's (``plan.replicas``:
    a Surge roll runs one extra ordinal and moves the partition down one pod at a time); ``claim_size``: the
    size the StatefulSet was created with (its claim templates cannot change).
    """
    deployment = builders.deployment_for(model, config, commit, claim_uid=claim_uid)
    template = deployment["spec"]["template"]
    pod_spec = template["spec"]
    server = pod_spec["containers"][0]
    server["args"] = _with_sibling_port(server["args"])
    server["ports"].append({"name": "sibling", "containerPort": SIBLING_PORT, "protocol": "TCP"})
    pod_spec["initContainers"] = [init_cache_container(model, config, commit)]
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if v["name"] != "cache"]  # the claim template's
    retention = "Delete" if deletes_scaled_down_claims(model) else "Retain"
    claim_template = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM_TEMPLATE, "labels": claim_labels(model), "annotations": _claim_annotations(model)},
        "spec": _claim_spec(model, config, claim_size),
    }
    metadata = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata,
        "spec": {
            "replicas": model.replicas if replicas is None else replicas,
            "serviceName": siblings_service_name(model),
            # Scaling starts (and removes) pods all at once: each fills its own claim, in parallel.
            "podManagementPolicy": "Parallel",
            "selector": deployment["spec"]["selector"],
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
            # Scaled-down replicas' claims stay (warm scale-up); the operator deletes them once expired.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": retention, "whenScaled": "Retain"},
            "template": template,
            "volumeClaimTemplates": [claim_template],
        },
    }


def _with_sibling_port(args: list[str]) -> list[str]:
    at = args.index("--") if "--" in args else len(args)
    return [*args[:at], "--sibling-port", str(SIBLING_PORT), *args[at:]]


def claim_template_size(statefulset: Mapping[str, Any] | None) -> str | None:
    """The storage size an existing StatefulSet's claim template asks for (immutable once created)."""
    for template in ((statefulset or {}).get("spec") or {}).get("volumeClaimTemplates") or []:
        if (template.get("metadata") or {}).get("name") == CLAIM_TEMPLATE:
            size = (((template.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
            return str(size) if size else None
    return None


def siblings_service_for(model: VLLMModel) -> dict[str, Any]:
    """The StatefulSet's headless Service: stable pod names, and one DNS name resolving to the ready replicas
    (a filling replica's ``--sibling``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": builders.child_metadata(model, siblings_service_name(model), builders.COMPONENT_SERVER),
        "spec": {
            "clusterIP": "None",
            "selector": builders.selector_for(model),
            "publishNotReadyAddresses": False,
            "ports": [{"name": "sibling", "port": SIBLING_PORT, "targetPort": "sibling", "protocol": "TCP"}],
        },
    }


def network_policy_for(model: VLLMModel) -> dict[str, Any]:
    """The sibling port, from the same model's pods only. A NetworkPolicy that selects pods isolates them for
    every port it does not allow, so the API and metrics ports are allowed as without it (from anywhere the
    namespace's other policies allow... and, policies being a union, from anywhere: docs/scaling.md)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": builders.child_metadata(model, f"{model.name}-siblings", builders.COMPONENT_SERVER),
        "spec": {
            "podSelector": {"matchLabels": builders.selector_for(model)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"port": "http", "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}]},
                {
                    "from": [{"podSelector": {"matchLabels": builders.selector_for(model)}}],
                    "ports": [{"port": SIBLING_PORT, "protocol": "TCP"}],
                },
            ],
        },
    }


# --- disruption budget -------------------------------------------------------------------------------


def wants_disruption_budget(model: VLLMModel) -> bool:
    budget: Mapping[str, Any] = model.spec.get("podDisruptionBudget") or {}
    return bool(budget.get("enabled", True)) and model.max_replicas >= 2


def disruption_budget_for(model: VLLMModel) -> dict[str, Any]:
    """A node drain evicts one model pod at a time (``spec.podDisruptionBudget.maxUnavailable``, default 1)."""
    budget: Mapping[str, Any] = model.spec.get("podDisruptionBudget") or {}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": builders.child_metadata(model, model.name, builders.COMPONENT_SERVER),
        "spec": {
            "maxUnavailable": budget.get("maxUnavailable", 1),
            "selector": {"matchLabels": builders.selector_for(model)},
            # A pod that is not ready (loading, crash-looping) may always be evicted: it serves nothing.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def children_for(model: VLLMModel, config: Config) -> list[dict[str, Any]]:
    """The children besides the workload: the headless Service and NetworkPolicy (PerReplica), the budget."""
    del config
    children: list[dict[str, Any]] = []
    if model.per_replica:
        children += [siblings_service_for(model), network_policy_for(model)]
    if wants_disruption_budget(model):
        children.append(disruption_budget_for(model))
    return children
