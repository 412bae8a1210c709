"""Pure builders: one function per child object of a VLLMModel.

No I/O here. The live operator's plan and ``vllm-operator render`` call the same functions, and
each returns the complete object the operator applies: ownerReferences (when the model has a uid;
never on a cache PVC kept with ``cache.deletePolicy: Retain``) and every bookkeeping annotation
(spec-hash, plan-digest, cache-claim-uid). Nothing decorates these objects afterwards, so what
``render`` prints is what the operator applies.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_runtime import layout, vllm_args
from vllm_runtime.planner import spec as plan_spec

from . import crd
from .config import Config
from .memory import plan_digest
from .model import VLLMModel

# Ports inside model pods and cache Jobs (the contract with vllm-runtime).
HTTP_PORT = 8000
RUNTIME_METRICS_PORT = 9090
# Stopping a server pod (vllm-runtime serve, on SIGTERM): /ready fails at once and vLLM keeps serving
# for ENDPOINT_DRAIN_SECONDS while endpoints, kube-proxy and inference gateways drop the pod; then vLLM
# finishes the requests in flight within DRAIN_TIMEOUT_SECONDS; the runtime kills it STOP_MARGIN_SECONDS
# later if it hangs. The pod's grace period covers all three, so the kubelet's SIGKILL never cuts a drain.
ENDPOINT_DRAIN_SECONDS = 5
DRAIN_TIMEOUT_SECONDS = 25
STOP_MARGIN_SECONDS = 15
TERMINATION_GRACE_PERIOD_SECONDS = ENDPOINT_DRAIN_SECONDS + DRAIN_TIMEOUT_SECONDS + STOP_MARGIN_SECONDS

SERVER_CONTAINER = "vllm"
CACHE_CONTAINER = "cache"

COMPONENT_SERVER = "server"
COMPONENT_CACHE = "cache"

ANNOTATION_PREFIX = "vllm-operator.io/"
ANNOTATION_MODEL = ANNOTATION_PREFIX + "model"
ANNOTATION_REVISION = ANNOTATION_PREFIX + "revision"
ANNOTATION_COMMIT = ANNOTATION_PREFIX + "commit"
LABEL_MODEL = ANNOTATION_PREFIX + "model"
# A hash of a cache Job's spec (``spec_hash``): a failed or stuck Job whose hash differs from the
# desired one was made from an older spec and is replaced.
ANNOTATION_SPEC_HASH = ANNOTATION_PREFIX + "spec-hash"
# The planner inputs a cache Job's ``--plan-*`` flags were made from (``memory.plan_digest``).
ANNOTATION_PLAN_DIGEST = ANNOTATION_PREFIX + "plan-digest"
# The uid of the cache PVC a cache Job filled / a Deployment serves from: a PVC deleted and re-created
# by hand comes back empty, and a different uid says so.
ANNOTATION_CLAIM_UID = ANNOTATION_PREFIX + "cache-claim-uid"

# Paths inside containers.
SHM_PATH = "/dev/shm"
TMP_PATH = "/tmp"

_GIB = 1024**3

# The cache volume's layout as seen inside cache Job and model pods.
POD_CACHE = layout.CacheLayout(Path(layout.CACHE_MOUNT_PATH))


# --- names and labels --------------------------------------------------------------------------------


def labels_for(model: VLLMModel, component: str) -> dict[str, str]:
    """The labels on every child (``component`` is ``cache`` or ``server``)."""
    return {
        "app.kubernetes.io/name": "vllm-model",
        "app.kubernetes.io/instance": model.name,
        "app.kubernetes.io/managed-by": "vllm-operator",
        "app.kubernetes.io/component": component,
        LABEL_MODEL: model.name,
    }


def selector_for(model: VLLMModel) -> dict[str, str]:
    """The model pods' selector (Deployment, Service, and ``status.selector`` for the scale subresource)."""
    return {
        "app.kubernetes.io/name": "vllm-model",
        "app.kubernetes.io/instance": model.name,
        "app.kubernetes.io/component": COMPONENT_SERVER,
    }


def selector_string(model: VLLMModel) -> str:
    """``selector_for`` as a label selector string (``status.selector``)."""
    return ",".join(f"{k}={v}" for k, v in selector_for(model).items())


def cache_pvc_name(model: VLLMModel) -> str:
    return f"{model.name}-cache"


def cache_job_name(model: VLLMModel, revision: str | None = None) -> str:
    """``<name>-cache-<8 hex of sha256("<model>@<revision>")>`` for ``revision`` (default: the spec's).

    A new revision gets a new Job (Jobs are immutable), the same one reuses it. The CRD limits
    names to 48 characters so this stays a valid 63-character label value (Kubernetes puts the
    Job's name into its pods' ``job-name`` label).
    """
    rev = revision if revision is not None else model.revision
    digest = hashlib.sha256(f"{model.spec['model']}@{rev}".encode()).hexdigest()[:8]
    return f"{model.name[:48]}-cache-{digest}"


def deployment_name(model: VLLMModel) -> str:
    return model.name


def service_name(model: VLLMModel) -> str:
    return model.name


def endpoint_for(model: VLLMModel) -> str:
    """The in-cluster OpenAI-compatible base URL (``status.endpoint``)."""
    return f"http://{service_name(model)}.{model.namespace}.svc:{HTTP_PORT}/v1"


def owner_reference_for(model: VLLMModel) -> dict[str, Any]:
    """The model as a child's controlling owner, so Kubernetes garbage-collects the child with it."""
    if not model.uid:
        raise ValueError(f"VLLMModel {model.namespace}/{model.name} has no metadata.uid")
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "name": model.name,
        "uid": model.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --- cache PVC ---------------------------------------------------------------------------------------


def cache_size_for(model: VLLMModel, config: Config) -> str:
    """The cache PVC's requested size.

    ``spec.cache.size`` wins. Otherwise the size follows the model: the weight bytes the memory
    planner found (``status.plan``) or a finished cache reported (``status.cache.bytes``), times
    ``config.cache_size_headroom`` -- room for a second commit cached beside the serving one during
    a revision change, plus vLLM's compile cache -- rounded up to whole GiB. Before either is known
    (the first reconcile of a new model) ``config.default_cache_size`` is used. PVCs only grow, so
    a later, better estimate can only enlarge the claim (where the storage class allows expansion).
    """
    explicit = model.cache.get("size")
    if explicit:
        return str(explicit)
    model_bytes = known_model_bytes(model)
    if not model_bytes:
        return config.default_cache_size
    gib = max(1, math.ceil(model_bytes * config.cache_size_headroom / _GIB))
    return f"{gib}Gi"


def known_model_bytes(model: VLLMModel) -> int | None:
    """The model's weight bytes if the status knows them (planner estimate or a finished cache)."""
    plan = model.status.get("plan") or {}
    candidates = [
        plan.get("weightBytes"),
        plan.get("weight_bytes"),
        (model.status.get("cache") or {}).get("bytes"),
    ]
    sizes = [int(c) for c in candidates if isinstance(c, int | float) and c > 0]
    return max(sizes) if sizes else None


def cache_pvc_for(model: VLLMModel, config: Config) -> dict[str, Any] | None:
    """The cache PVC ``<name>-cache``; None when ``cache.existingClaim`` is set or the model is pvc://.
    With ``cache.sharing: PerReplica``: replica 0's claim, which the cache Job fills (``replicas``)."""
    if not model.owns_cache_pvc:
        return None
    if model.per_replica:
        from . import replicas  # builds on this module

        return replicas.replica_zero_claim_for(model, config)
    spec: dict[str, Any] = {
        "accessModes": list(model.cache.get("accessModes") or ["ReadWriteOnce"]),
        "resources": {"requests": {"storage": cache_size_for(model, config)}},
    }
    storage_class = model.cache.get("storageClassName") or config.default_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    annotations = {ANNOTATION_MODEL: str(model.spec["model"])}
    annotations[ANNOTATION_PREFIX + "delete-policy"] = str(model.cache.get("deletePolicy", "Retain"))
    # Retain: the cache outlives the model, so the model must not own it (the garbage collector would
    # delete it with the model).
    owned = model.cache.get("deletePolicy", "Retain") == "Delete"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(model, cache_pvc_name(model), COMPONENT_CACHE, annotations, owned=owned),
        "spec": spec,
    }


# --- cache Job ---------------------------------------------------------------------------------------


def cache_job_for(
    model: VLLMModel,
    config: Config,
    revision: str | None = None,
    *,
    claim_uid: str | None = None,
    ttl_seconds: int | None = None,
) -> dict[str, Any]:
    """The Job that caches and verifies ``revision`` (default: the spec's) on the cache volume.

    Its pod writes a one-line JSON summary (``vllm_runtime.summary``) to its termination message,
    which is how the outcome reaches ``status`` without giving pods API rights. Exit code 3 is a
    permanent failure (bad token, unknown repo, no space): the Job fails at once instead of
    retrying ``backoffLimit`` times.

    ``claim_uid``: the uid of the cache PVC it fills (annotated). ``ttl_seconds``: set once nothing
    needs the finished Job any more (the Deployment's annotations carry its commit); the only field
    of a Job that may change after it was created, so ``spec_hash`` leaves it out.
    """
    rev = revision if revision is not None else model.revision
    args = [
        "cache",
        "--model", model.model_argument,
        "--revision", rev,
        "--cache-dir", layout.CACHE_MOUNT_PATH,
        "--metrics-port", str(RUNTIME_METRICS_PORT),
        "--termination-message-path", layout.TERMINATION_MESSAGE_PATH,
    ]  # fmt: skip
    args += cache_plan_flags(model)
    env = _hub_env(offline=False)
    if config.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": config.hf_endpoint})
    token = model.hf_token_secret_ref
    if token:
        # Only ever a reference: the token's value never appears in the manifest.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token["name"], "key": token["key"]}}})
    env += _user_env(model)
    container: dict[str, Any] = {
        "name": CACHE_CONTAINER,
        "image": _image(model, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["vllm-runtime"],
        "args": args,
        "env": env,
        "ports": [{"name": "metrics", "containerPort": RUNTIME_METRICS_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": config.cache_job_cpu, "memory": config.cache_job_memory},
            "limits": {"memory": config.cache_job_memory},
        },
        "volumeMounts": _volume_mounts(model, shm=False),
        "securityContext": _container_security_context(),
        "terminationMessagePath": layout.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(config),
        "containers": [container],
        "volumes": _volumes(model, config, shm=False),
    }
    # The cache Job runs where model pods may run: a ReadWriteOnce cache volume can only be
    # attached to one node at a time, and model pods' node constraints are where it will be used.
    _add_placement(pod_spec, model)
    if model.per_replica:
        from . import replicas  # builds on this module

        replicas.near_replica_zero(pod_spec, model)
    job_spec: dict[str, Any] = {
        "backoffLimit": config.cache_job_backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CACHE_CONTAINER, "operator": "In", "values": [3]},
                },
                # A node drain or preemption is not the cache's fault: retry without counting it.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {"labels": labels_for(model, COMPONENT_CACHE), "annotations": _model_annotations(model, rev)},
            "spec": pod_spec,
        },
    }
    if config.cache_job_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = config.cache_job_deadline_seconds
    if ttl_seconds is not None:
        job_spec["ttlSecondsAfterFinished"] = ttl_seconds
    annotations = _model_annotations(model, rev)
    annotations[ANNOTATION_SPEC_HASH] = spec_hash(job_spec)
    if cache_plan_flags(model):
        annotations[ANNOTATION_PLAN_DIGEST] = plan_digest(model)
    if claim_uid:
        annotations[ANNOTATION_CLAIM_UID] = claim_uid
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(model, cache_job_name(model, rev), COMPONENT_CACHE, annotations),
        "spec": job_spec,
    }


def spec_hash(job_spec: Mapping[str, Any]) -> str:
    """A short hash of a Job's spec, without ``ttlSecondsAfterFinished`` (set later on the same Job)."""
    hashed = {k: v for k, v in job_spec.items() if k != "ttlSecondsAfterFinished"}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


def cache_plan_flags(model: VLLMModel) -> list[str]:
    """``--plan-*`` flags: with ``spec.gpu`` the cache Job also plans GPU memory from the files it cached
    (exactly, and with the token the operator never reads); the plan comes back in its termination message."""
    try:
        return plan_spec.plan_flags(model.spec)
    except ValueError:  # a malformed spec.gpu.memory: the operator's own plan reports it (PlanFailed)
        return []


# --- Deployment --------------------------------------------------------------------------------------


def deployment_for(model: VLLMModel, config: Config, commit: str, *, claim_uid: str | None = None) -> dict[str, Any]:
    """The model server Deployment, serving ``commit`` (a 40-hex commit whose cache Job succeeded).

    Pods serve offline from the cache (``HF_HUB_OFFLINE=1``); a new commit changes the pod
    template, so Kubernetes rolls with maxUnavailable 0: old pods serve until new ones are ready.
    The pod template depends only on the commit and the serving spec: ``spec.revision`` (a branch,
    a tag, or the commit itself) is annotated on the Deployment, never in the template, so pinning a
    branch to the commit it already serves replaces no pod. ``claim_uid``: the cache PVC it serves
    from (annotated).
    """
    from . import lora  # builds on this module

    flags = vllm_args.vllm_flags(model.serving_spec)
    args = [
        "serve",
        "--model", model.model_argument,
        "--revision", commit,
        "--cache-dir", layout.CACHE_MOUNT_PATH,
        "--port", str(HTTP_PORT),
        "--metrics-port", str(RUNTIME_METRICS_PORT),
        "--endpoint-drain-seconds", str(ENDPOINT_DRAIN_SECONDS),
        "--drain-timeout", str(DRAIN_TIMEOUT_SECONDS),
        *lora.serve_args(model),  # the adapters file and vLLM's LoRA limits, never the adapter set itself
        "--", *flags,
    ]  # fmt: skip
    env = _hub_env(offline=True) + [
        # vLLM's compile cache lives on the cache volume so restarts skip torch.compile;
        # vllm-runtime narrows it to one directory per configuration (vllm_args.compile_cache_key).
        {"name": "VLLM_CACHE_ROOT", "value": str(POD_CACHE.compile_root)},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "HOME", "value": TMP_PATH},
    ]
    env += _user_env(model)
    resources = _resources_with_gpus(model, config)
    port = "metrics"
    period = config.probe_period_seconds
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": _image(model, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["vllm-runtime"],
        "args": args,
        "env": env,
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": RUNTIME_METRICS_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": _volume_mounts(model, shm=True),
        "securityContext": _container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # /live answers as soon as vllm-runtime runs, also while vLLM loads and compiles; the
        # startup probe's budget covers a slow first start, so loading pods are never killed.
        "startupProbe": _probe("/live", port, period, max(1, math.ceil(config.startup_timeout_seconds / period))),
        "livenessProbe": _probe("/live", port, period, config.liveness_failure_threshold),
        "readinessProbe": _probe("/ready", port, period, 3),
    }
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # model pods need no Kubernetes API rights
        # Service links would put e.g. VLLM_PORT=tcp://... into the environment when a Service is
        # named "vllm", and vLLM reads VLLM_PORT as its own setting and refuses to start.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_PERIOD_SECONDS,
        "securityContext": _pod_security_context(config),
        "containers": [container],
        "volumes": _volumes(model, config, shm=True),
    }
    lora_volumes, lora_mounts = lora.pod_volumes(model)
    pod_spec["volumes"] += lora_volumes
    container["volumeMounts"] += lora_mounts
    if config.runtime_class_name:
        pod_spec["runtimeClassName"] = config.runtime_class_name
    _add_placement(pod_spec, model)
    from . import replicas  # builds on this module

    if replicas.wants_spread(model):
        pod_spec["topologySpreadConstraints"] = replicas.topology_spread_for(model)
    template_annotations = {ANNOTATION_MODEL: str(model.spec["model"]), ANNOTATION_COMMIT: commit}
    annotations = {**_model_annotations(model, model.revision), ANNOTATION_COMMIT: commit}
    if claim_uid:
        annotations[ANNOTATION_CLAIM_UID] = claim_uid
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(model, deployment_name(model), COMPONENT_SERVER, annotations),
        "spec": {
            "replicas": model.replicas,
            # A first start may load and compile for up to startup_timeout_seconds; until then the
            # rollout is progressing, not stuck (plus time to pull the large vLLM image).
            "progressDeadlineSeconds": config.startup_timeout_seconds + 600,
            "selector": {"matchLabels": selector_for(model)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": _rolling_update(model)},
            "template": {
                "metadata": {"labels": labels_for(model, COMPONENT_SERVER), "annotations": template_annotations},
                "spec": pod_spec,
            },
        },
    }


def _rolling_update(model: VLLMModel) -> dict[str, Any]:
    """Surge: one extra pod, none unavailable (needs a spare GPU). InPlace: no extra pod, one pod at a time."""
    if model.rollout_strategy == "InPlace":
        return {"maxUnavailable": 1, "maxSurge": 0}
    return {"maxUnavailable": 0, "maxSurge": 1}


def workload_for(model: VLLMModel, config: Config, commit: str, *, claim_uid: str | None = None) -> dict[str, Any]:
    """The model pods' workload: a Deployment (``cache.sharing: Shared``) or a StatefulSet with a claim per
    replica (``PerReplica``, ``replicas.statefulset_for``), as first applied (no rollout in progress)."""
    if model.per_replica:
        from . import replicas  # builds on this module

        return replicas.statefulset_for(model, config, commit, claim_uid=claim_uid)
    return deployment_for(model, config, commit, claim_uid=claim_uid)


# --- Service -----------------------------------------------------------------------------------------


def service_for(model: VLLMModel, config: Config) -> dict[str, Any]:
    """The Service in front of the model pods: the OpenAI API and the runtime's metrics."""
    del config  # same signature as the other builders; nothing configurable yet
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(model, service_name(model), COMPONENT_SERVER, {}),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_for(model),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": RUNTIME_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def children_for(
    model: VLLMModel,
    config: Config,
    commit: str,
    *,
    claim_uid: str | None = None,
    served: bool = False,
    adapter_commits: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every child, in creation order: cache PVC (if any), cache Job, Deployment, Service, then the
    autoscaler (ScaledObject or HPA) and InferencePool when the spec asks for them.

    What ``render`` prints; the plan calls the same builders one at a time, as each child's turn comes.
    ``claim_uid``: the cache PVC's uid, known only in a cluster. ``served``: the Deployment serves
    ``commit`` already, so the finished cache Job carries its ``ttlSecondsAfterFinished``.
    With ``spec.adapters``: each Hub adapter's cache Job and the adapters ConfigMap, whose entries carry
    ``adapter_commits`` (by adapter name; default: the commits ``status.adapters`` records).
    """
    # Imported here: autoscaling and lora build on this module (labels, selector, metadata).
    from . import autoscaling, lora

    ttl = config.cache_job_ttl_seconds if served else None
    children = [cache_pvc_for(model, config), cache_job_for(model, config, claim_uid=claim_uid, ttl_seconds=ttl)]
    if lora.enabled(model):
        children += [lora.adapter_cache_job_for(model, config, a, claim_uid=claim_uid, ttl_seconds=ttl)
                     for a in lora.hub_adapters(model)]  # fmt: skip
        commits = lora.status_commits(model) if adapter_commits is None else adapter_commits
        children.append(lora.config_map_for(model, lora.file_entries(model, commits)))
    children += [workload_for(model, config, commit, claim_uid=claim_uid), service_for(model, config)]
    from . import replicas

    children += replicas.children_for(model, config)

    children += autoscaling.children_for(model, config)
    return [child for child in children if child is not None]


def child_metadata(model: VLLMModel, name: str, component: str) -> dict[str, Any]:
    """The metadata of an owned child without annotations (for builders in other modules)."""
    return _metadata(model, name, component, {})


# --- private helpers ---------------------------------------------------------------------------------


def _metadata(
    model: VLLMModel, name: str, component: str, annotations: dict[str, str], *, owned: bool = True
) -> dict[str, Any]:
    """A child's metadata; owned by the model when ``owned`` and the model has a uid (a body without one,
    e.g. a file given to ``render``, cannot be referenced: a made-up uid gets the child collected)."""
    metadata: dict[str, Any] = {"name": name, "namespace": model.namespace, "labels": labels_for(model, component)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if owned and model.uid:
        metadata["ownerReferences"] = [owner_reference_for(model)]
    return metadata


def _model_annotations(model: VLLMModel, revision: str) -> dict[str, str]:
    return {ANNOTATION_MODEL: str(model.spec["model"]), ANNOTATION_REVISION: revision}


def _image(model: VLLMModel, config: Config) -> str:
    return str(model.spec.get("image") or config.runtime_image)


def _hub_env(*, offline: bool) -> list[dict[str, Any]]:
    env = [
        {"name": "HF_HUB_CACHE", "value": str(POD_CACHE.hub_cache)},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if offline:
        env.insert(0, {"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def _user_env(model: VLLMModel) -> list[dict[str, Any]]:
    """``spec.env`` (the CRD refuses names the operator sets itself)."""
    return [dict(item) for item in model.spec.get("env") or []]


def _resources_with_gpus(model: VLLMModel, config: Config) -> dict[str, Any]:
    """``spec.resources`` plus ``<gpu resource>: tensorParallelSize`` in limits (requests follow limits
    for extended resources)."""
    resources: dict[str, Any] = {k: dict(v) for k, v in (model.spec.get("resources") or {}).items()}
    if config.gpu_resource:
        gpus = model.tensor_parallel_size
        resources.setdefault("limits", {})[config.gpu_resource] = gpus
        if config.gpu_resource in resources.get("requests", {}):
            resources["requests"][config.gpu_resource] = gpus
    return resources


def _probe(path: str, port: str, period: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failure_threshold,
    }


def _pod_security_context(config: Config) -> dict[str, Any]:
    """Pod Security Standards "restricted"; fsGroup makes the cache volume writable for the user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": config.run_as_user,
        "runAsGroup": config.run_as_user,
        "fsGroup": config.run_as_user,
        # A cache volume holds many GiB; re-chowning it on every pod start would be slow.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,  # writable places: /cache, /tmp, /dev/shm
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volume_mounts(model: VLLMModel, *, shm: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": layout.CACHE_MOUNT_PATH},
        {"name": "tmp", "mountPath": TMP_PATH},
    ]
    if shm:
        mounts.append({"name": "shm", "mountPath": SHM_PATH})
    if model.source.claim:
        # The whole claim, read-only, at /models/<claim>; --model points at the directory inside it.
        mounts.append(
            {"name": "model", "mountPath": f"{layout.MODELS_MOUNT_ROOT}/{model.source.claim}", "readOnly": True}
        )
    return mounts


def _volumes(model: VLLMModel, config: Config, *, shm: bool) -> list[dict[str, Any]]:
    claim = model.cache_claim_name
    cache: dict[str, Any] = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
        if claim
        else {"name": "cache", "emptyDir": {}}
    )
    volumes = [cache, {"name": "tmp", "emptyDir": {}}]
    if shm:
        # vLLM's workers exchange tensors through shared memory; the container default (64Mi) is too small.
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
    if model.source.claim:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": model.source.claim, "readOnly": True}})
    return volumes


def _add_placement(pod_spec: dict[str, Any], model: VLLMModel) -> None:
    """Copy the spec's scheduling and pull settings into a pod spec."""
    for field in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        value = model.spec.get(field)
        if value:
            pod_spec[field] = value
