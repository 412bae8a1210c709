"""The operator's own Prometheus metrics (names fixed by CONTRACTS.md), served on Config.metrics_port.

- ``vllm_operator_reconcile_total{result}``: reconciles by result (success, retry, error)
- ``vllm_operator_reconcile_errors_total``: reconciles that did not succeed (retry + error)
- ``vllm_operator_reconcile_duration_seconds``: reconcile duration histogram
- ``vllm_operator_models{phase}``: VLLMModels per phase, as last reconciled by this operator
- ``vllm_operator_tracked_models``: models with per-model state in memory (falls back to 0 as models go)
- ``vllm_operator_api_requests_total{verb,resource}``: requests the operator's own client made (kopf's
  watches are not counted here): get, list, apply, patch, create, delete; resource as plural[/subresource]
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
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

_phases: dict[tuple[str, str], str] = {}
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


def forget(namespace: str, name: str) -> None:
    set_phase(namespace, name, None)


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
