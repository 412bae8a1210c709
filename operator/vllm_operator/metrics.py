"""The operator's own Prometheus metrics (names fixed by CONTRACTS.md), served on Config.metrics_port.

- ``vllm_operator_reconcile_total{result}``: reconciles by result (success, retry, error)
- ``vllm_operator_reconcile_errors_total``: reconciles that did not succeed (retry + error)
- ``vllm_operator_reconcile_duration_seconds``: reconcile duration histogram
- ``vllm_operator_models{phase}``: VLLMModels per phase, as last reconciled by this operator
- ``vllm_operator_tracked_models``: models with per-model state in memory (falls back to 0 as models go)
- ``vllm_operator_api_requests_total{verb,resource}``: requests the operator's own client made (kopf's
  watches are not counted here): get, list, apply, patch, create, delete; resource as plural[/subresource]
- ``vllm_operator_autoscaling_{desired,current,min,max}_replicas{namespace,model}``: per VLLMModel with
  ``spec.autoscaling``, from its ``status.autoscaling`` as last reconciled: the autoscaler's ``spec.replicas``
  (desired), the Deployment's pods (current) and the bounds. The chart's alerts "at maxReplicas" and
  "queue growing while not scaling" read them beside vLLM's queue (same ``namespace``/``model`` labels; the
  operator's ServiceMonitor honours them). Not kube-state-metrics: it knows nothing of a VLLMModel without
  a custom-resource config, and its HPA series name KEDA's HPA ``keda-hpa-<name>``, not the model.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Mapping
from typing import Any

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

PHASES = ("Pending", "Caching", "Loading", "Ready", "Failed")

RECONCILES = Counter("vllm_operator_reconcile", "VLLMModel reconciles by result", ["result"])
ERRORS = Counter("vllm_operator_reconcile_errors", "VLLMModel reconciles that failed or must be retried")
DURATION = Histogram(
    "vllm_operator_reconcile_duration_seconds",
    "Time to reconcile one VLLMModel (observe, plan, act, status)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
MODELS = Gauge("vllm_operator_models", "VLLMModels per phase", ["phase"])
TRACKED = Gauge(
    "vllm_operator_tracked_models", "Models with per-model state in the operator's memory (queue, timers, plans)"
)
API_REQUESTS = Counter(
    "vllm_operator_api_requests", "Kubernetes API requests made by the operator's client", ["verb", "resource"]
)

AUTOSCALING_FIELDS = {
    "desired": ("desiredReplicas", "Replicas the autoscaler asks for (the VLLMModel's spec.replicas)"),
    "current": ("currentReplicas", "Pods of the VLLMModel's Deployment"),
    "min": ("minReplicas", "spec.autoscaling.minReplicas"),
    "max": ("maxReplicas", "spec.autoscaling.maxReplicas"),
}
AUTOSCALING = {
    kind: Gauge(f"vllm_operator_autoscaling_{kind}_replicas", doc, ["namespace", "model"])
    for kind, (_, doc) in AUTOSCALING_FIELDS.items()
}

_phases: dict[tuple[str, str], str] = {}
_autoscaled: set[tuple[str, str]] = set()
_lock = threading.Lock()

for _phase in PHASES:
    MODELS.labels(phase=_phase).set(0)
for _result in ("success", "retry", "error"):
    RECONCILES.labels(result=_result)


def record_reconcile(result: str, seconds: float) -> None:
    RECONCILES.labels(result=result).inc()
    DURATION.observe(seconds)
    if result != "success":
        ERRORS.inc()


def count_request(method: str, path: str, content_type: str = "") -> None:
    """Count one API request by verb and resource (``/api/v1/namespaces/ns/pods/x`` -> get, pods)."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    # /api/v1/... or /apis/group/version/...; then optionally namespaces/<ns>; then plural[/name[/sub]]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if len(rest) >= 2 and rest[0] == "namespaces":
        rest = rest[2:]
    plural = rest[0] if rest else "unknown"
    named = len(rest) >= 2
    resource = f"{plural}/{rest[2]}" if len(rest) >= 3 else plural
    verb = {
        "GET": "get" if named else "list",
        "POST": "create",
        "DELETE": "delete",
        "PUT": "update",
    }.get(method, "apply" if "apply-patch" in content_type else "patch")
    API_REQUESTS.labels(verb=verb, resource=resource).inc()


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase
        _publish()


def set_autoscaling(namespace: str, name: str, summary: Mapping[str, Any] | None) -> None:
    """Publish a model's ``status.autoscaling`` (None or empty: the model does not autoscale; its series go)."""
    with _lock:
        if not summary:
            if (namespace, name) in _autoscaled:
                _autoscaled.discard((namespace, name))
                for gauge in AUTOSCALING.values():
                    gauge.remove(namespace, name)
            return
        _autoscaled.add((namespace, name))
        for kind, (field, _) in AUTOSCALING_FIELDS.items():
            AUTOSCALING[kind].labels(namespace=namespace, model=name).set(float(summary.get(field) or 0))


def forget(namespace: str, name: str) -> None:
    set_phase(namespace, name, None)
    set_adapters(namespace, name, None)
    set_autoscaling(namespace, name, None)


# spec.adapters, per adapter: the model's ready replicas, and those whose runtime reported the adapter loaded at
# its published commit (a replica that did not answer is not counted as loaded). The alert "adapter not loaded
# on all replicas" compares them.
ADAPTER_LOADED = Gauge(
    "vllm_operator_adapter_replicas_loaded", "Ready replicas with the LoRA adapter loaded at its published commit",
    ["namespace", "model", "adapter"],
)
ADAPTER_READY = Gauge(
    "vllm_operator_adapter_replicas_ready", "Ready replicas of the model serving the LoRA adapter",
    ["namespace", "model", "adapter"],
)
_adapters: dict[tuple[str, str], set[str]] = {}


def set_adapters(namespace: str, name: str, adapters: Any) -> None:
    """Publish ``status.adapters`` (None or absent: the model has none, or is gone)."""
    entries = [a for a in adapters or [] if isinstance(a, dict) and a.get("name")]
    with _lock:
        now = {str(a["name"]) for a in entries}
        for gone in _adapters.pop((namespace, name), set()) - now:
            for gauge in (ADAPTER_LOADED, ADAPTER_READY):
                try:
                    gauge.remove(namespace, name, gone)
                except KeyError:
                    pass
        for a in entries:
            ADAPTER_LOADED.labels(namespace, name, str(a["name"])).set(int(a.get("loadedReplicas") or 0))
            ADAPTER_READY.labels(namespace, name, str(a["name"])).set(int(a.get("readyReplicas") or 0))
        if now:
            _adapters[(namespace, name)] = now


def _publish() -> None:
    tally = _Tally(_phases.values())
    for phase in set(PHASES) | set(tally):
        MODELS.labels(phase=phase).set(tally.get(phase, 0))


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve /metrics on ``port`` in a thread; returns the server (call ``.shutdown()``), None if port is 0."""
    if not port:
        return None
    server, _thread = prometheus_client.start_http_server(port, addr=addr)
    return server
