"""The operator's one configuration, read once from ``VLLM_OPERATOR_*`` environment variables.

Handlers and builders receive a ``Config``; nothing else in the operator reads ``os.environ``.

========================================  ===========================================  ==========================
Variable                                  Meaning                                      Default
========================================  ===========================================  ==========================
VLLM_OPERATOR_RUNTIME_IMAGE               image of cache Jobs and model pods           ghcr.io/vllm-model-operator/runtime:0.1.0
                                          (a VLLMModel's ``spec.image`` overrides it)
VLLM_OPERATOR_IMAGE_PULL_POLICY           imagePullPolicy of those containers          IfNotPresent
VLLM_OPERATOR_NAMESPACES                  comma-separated namespaces to watch          (empty: all namespaces)
VLLM_OPERATOR_METRICS_PORT                port of the operator's own /metrics          8080
VLLM_OPERATOR_DEFAULT_STORAGE_CLASS       storageClassName of cache PVCs that set      (empty: the cluster's default)
                                          none
VLLM_OPERATOR_DEFAULT_CACHE_SIZE          cache PVC size when the model's size is      100Gi
                                          not known yet
VLLM_OPERATOR_CACHE_SIZE_HEADROOM         cache PVC size = model bytes x this factor   2.2
VLLM_OPERATOR_HF_ENDPOINT                 HF_ENDPOINT for cache Jobs (a Hub mirror)    (empty: huggingface.co)
VLLM_OPERATOR_GPU_RESOURCE                extended resource requested per GPU          nvidia.com/gpu
                                          (empty: request none, e.g. CPU clusters)
VLLM_OPERATOR_RUNTIME_CLASS_NAME          runtimeClassName of model pods               (empty: none)
VLLM_OPERATOR_RUN_AS_USER                 runAsUser/runAsGroup/fsGroup of pods         1000
VLLM_OPERATOR_SHM_SIZE                    size of the /dev/shm memory volume           2Gi
VLLM_OPERATOR_STARTUP_TIMEOUT_SECONDS     how long a model pod may load and compile    3600
                                          before the startup probe gives up
VLLM_OPERATOR_PROBE_PERIOD_SECONDS        period of all model pod probes               10
VLLM_OPERATOR_LIVENESS_FAILURE_THRESHOLD  failed /live checks before a restart         3
VLLM_OPERATOR_CACHE_JOB_BACKOFF_LIMIT     retries of a cache Job (retryable failures)  6
VLLM_OPERATOR_CACHE_JOB_DEADLINE_SECONDS  activeDeadlineSeconds of a cache Job         21600 (6 h; 0: none)
VLLM_OPERATOR_CACHE_JOB_TTL_SECONDS       ttlSecondsAfterFinished set on a finished    3600
                                          cache Job once its commit is deployed
VLLM_OPERATOR_ALLOWED_IMAGE_REGISTRIES    comma-separated registry/repository          (empty: any image)
                                          prefixes ``spec.image`` must start with,
                                          e.g. ``ghcr.io/vllm-model-operator/``
VLLM_OPERATOR_CACHE_JOB_CPU               CPU request of a cache Job                   500m
VLLM_OPERATOR_CACHE_JOB_MEMORY            memory request and limit of a cache Job      2Gi
VLLM_OPERATOR_RECONCILE_INTERVAL_SECONDS  each model is reconciled again this long     30
                                          after its last reconcile (reads nothing)
VLLM_OPERATOR_RECONCILE_WORKERS           models reconciled at once                    16
VLLM_OPERATOR_RETRY_BASE_DELAY_SECONDS    first retry delay; doubles per failure,      0.5
                                          with jitter
VLLM_OPERATOR_RETRY_MAX_DELAY_SECONDS     cap of the retry delay                       60
VLLM_OPERATOR_SURFACE_FAILURES_AFTER_SECONDS  a transient write failure lasting this    10
                                          long shows as Failed (ApiUnavailable)
VLLM_OPERATOR_WORKER_LIMIT                most per-object workers kopf runs at once    0 (unlimited)
                                          per watched kind (bounds a burst's memory)
VLLM_OPERATOR_FIELD_MANAGER               field manager name for writes                vllm-operator
VLLM_OPERATOR_PROMETHEUS_ADDRESS          Prometheus URL of KEDA ScaledObjects whose   (empty: the spec must say)
                                          spec.autoscaling.serverAddress is unset
========================================  ===========================================  ==========================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "VLLM_OPERATOR_"


@dataclass(frozen=True)
class Config:
    """Operator settings; see the module docstring for the environment variables."""

    runtime_image: str = "ghcr.io/vllm-model-operator/runtime:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8080
    default_storage_class: str | None = None
    default_cache_size: str = "100Gi"
    cache_size_headroom: float = 2.2
    hf_endpoint: str | None = None
    gpu_resource: str | None = "nvidia.com/gpu"
    runtime_class_name: str | None = None
    run_as_user: int = 1000
    shm_size: str = "2Gi"
    startup_timeout_seconds: int = 3600
    probe_period_seconds: int = 10
    liveness_failure_threshold: int = 3
    cache_job_backoff_limit: int = 6
    cache_job_deadline_seconds: int | None = 6 * 3600
    cache_job_ttl_seconds: int = 3600
    allowed_image_registries: tuple[str, ...] = ()
    cache_job_cpu: str = "500m"
    cache_job_memory: str = "2Gi"
    reconcile_interval_seconds: float = 30.0
    reconcile_workers: int = 16
    retry_base_delay_seconds: float = 0.5
    retry_max_delay_seconds: float = 60.0
    surface_failures_after_seconds: float = 10.0
    worker_limit: int = 0
    field_manager: str = "vllm-operator"
    prometheus_address: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read the configuration; raise ValueError naming the variable when a value is malformed."""
        env = os.environ if environ is None else environ
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(PREFIX + name, "").strip() or default

        def optional(name: str, default: str | None) -> str | None:
            value = env.get(PREFIX + name)
            if value is None:
                return default
            return value.strip() or None

        def number(name: str, default: float, kind: type[int] | type[float]) -> float:
            raw = env.get(PREFIX + name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{PREFIX}{name}={raw!r} is not a {kind.__name__}") from None
            if value < 0:
                raise ValueError(f"{PREFIX}{name}={raw!r} must not be negative")
            return value

        deadline = number("CACHE_JOB_DEADLINE_SECONDS", defaults.cache_job_deadline_seconds or 0, int)
        registries = tuple(
            prefix.strip() for prefix in env.get(PREFIX + "ALLOWED_IMAGE_REGISTRIES", "").split(",") if prefix.strip()
        )
        namespaces = tuple(ns.strip() for ns in env.get(PREFIX + "NAMESPACES", "").split(",") if ns.strip())
        return cls(
            runtime_image=text("RUNTIME_IMAGE", defaults.runtime_image),
            image_pull_policy=text("IMAGE_PULL_POLICY", defaults.image_pull_policy),
            namespaces=namespaces,
            metrics_port=int(number("METRICS_PORT", defaults.metrics_port, int)),
            default_storage_class=optional("DEFAULT_STORAGE_CLASS", defaults.default_storage_class),
            default_cache_size=text("DEFAULT_CACHE_SIZE", defaults.default_cache_size),
            cache_size_headroom=float(number("CACHE_SIZE_HEADROOM", defaults.cache_size_headroom, float)),
            hf_endpoint=optional("HF_ENDPOINT", defaults.hf_endpoint),
            gpu_resource=optional("GPU_RESOURCE", defaults.gpu_resource),
            runtime_class_name=optional("RUNTIME_CLASS_NAME", defaults.runtime_class_name),
            run_as_user=int(number("RUN_AS_USER", defaults.run_as_user, int)),
            shm_size=text("SHM_SIZE", defaults.shm_size),
            startup_timeout_seconds=int(number("STARTUP_TIMEOUT_SECONDS", defaults.startup_timeout_seconds, int)),
            probe_period_seconds=int(number("PROBE_PERIOD_SECONDS", defaults.probe_period_seconds, int)) or 1,
            liveness_failure_threshold=int(
                number("LIVENESS_FAILURE_THRESHOLD", defaults.liveness_failure_threshold, int)
            ) or 1,
            cache_job_backoff_limit=int(number("CACHE_JOB_BACKOFF_LIMIT", defaults.cache_job_backoff_limit, int)),
            cache_job_deadline_seconds=int(deadline) or None,
            cache_job_ttl_seconds=int(number("CACHE_JOB_TTL_SECONDS", defaults.cache_job_ttl_seconds, int)),
            allowed_image_registries=registries,
            cache_job_cpu=text("CACHE_JOB_CPU", defaults.cache_job_cpu),
            cache_job_memory=text("CACHE_JOB_MEMORY", defaults.cache_job_memory),
            reconcile_interval_seconds=float(
                number("RECONCILE_INTERVAL_SECONDS", defaults.reconcile_interval_seconds, float)
            ),
            reconcile_workers=int(number("RECONCILE_WORKERS", defaults.reconcile_workers, int)) or 1,
            retry_base_delay_seconds=float(
                number("RETRY_BASE_DELAY_SECONDS", defaults.retry_base_delay_seconds, float)
            ),
            retry_max_delay_seconds=float(number("RETRY_MAX_DELAY_SECONDS", defaults.retry_max_delay_seconds, float)),
            surface_failures_after_seconds=float(
                number("SURFACE_FAILURES_AFTER_SECONDS", defaults.surface_failures_after_seconds, float)
            ),
            worker_limit=int(number("WORKER_LIMIT", defaults.worker_limit, int)),
            field_manager=text("FIELD_MANAGER", defaults.field_manager),
            prometheus_address=optional("PROMETHEUS_ADDRESS", defaults.prometheus_address),
        )
