"""The PromQL of autoscaling: one place that says which query each ``spec.autoscaling.metric`` means.

The KEDA ``ScaledObject``, the prometheus-adapter rules of the HPA engine, the chart's alerts and
dashboard all render from these functions, and tests/test_autoscaling_prometheus.py evaluates the
very same strings against a real Prometheus scraping a real vLLM.

Labels: the chart's PodMonitor and ServiceMonitor (charts/vllm-operator/templates/model-monitors.yaml,
``vllm-operator.modelRelabelings``) copy the pod label ``vllm-operator.io/model`` to ``model``, the
pod label ``app.kubernetes.io/component`` to ``component`` and the pod name to ``pod``; the Prometheus
Operator adds ``namespace``. vLLM itself adds ``model_name`` and ``engine`` (one per data-parallel
engine in a pod). The queries therefore select a model's server pods with
``{namespace="<ns>",model="<name>",component="server"}``.

Per pod, first ``max by (namespace, pod, engine)``: a pod scraped twice (PodMonitor and
ServiceMonitor both enabled, each its own ``job``) counts once. Then, per pod, queue and running
counts add up over engines while the KV-cache usage (a fraction) is averaged over them.

How the engines turn this into replicas:

- KEDA (``keda_query``): the SUM over the model's pods, with the trigger's ``metricType: AverageValue``
  and ``threshold`` = the per-replica target. The HPA that KEDA makes divides by the target:
  desired = ceil(sum / target) = ceil(current * average / target).
- HPA with prometheus-adapter (``adapter_rule``): a ``Pods`` metric named ``adapter_metric_name(m)``;
  the adapter answers one value per pod of the scale target's selector (``status.selector``), the HPA
  averages them and compares with ``target.averageValue``: the same formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vllm_operator.builders import COMPONENT_SERVER

MetricName = Literal["queueDepth", "runningRequests", "kvCacheUsage"]

# Labels as the chart's monitors write them (``vllm-operator.modelRelabelings``).
NAMESPACE_LABEL = "namespace"
MODEL_LABEL = "model"
COMPONENT_LABEL = "component"
POD_LABEL = "pod"
# vLLM's own label: one value per data-parallel engine of a pod.
ENGINE_LABEL = "engine"


@dataclass(frozen=True)
class SignalMetric:
    """One scaling signal: vLLM's series and how a pod's engines combine into the pod's value."""

    name: MetricName
    vllm_series: str
    per_pod: Literal["sum", "avg"]  # over a pod's engines: counts add up, a fraction is averaged
    description: str


METRICS: Mapping[str, SignalMetric] = {
    m.name: m
    for m in (
        SignalMetric("queueDepth", "vllm:num_requests_waiting", "sum", "requests waiting for a slot, per replica"),
        SignalMetric("runningRequests", "vllm:num_requests_running", "sum", "requests being generated, per replica"),
        SignalMetric(
            "kvCacheUsage", "vllm:kv_cache_usage_perc", "avg", "fraction of the KV cache in use (0-1), per replica"
        ),
    )
}


class UnknownMetricError(ValueError):
    """``spec.autoscaling.metric`` names no signal this module knows."""

    def __init__(self, metric: str) -> None:
        super().__init__(
            f"spec.autoscaling.metric {metric!r} is not one of {', '.join(METRICS)}: pick one of them, or set "
            "spec.autoscaling.prometheusQuery with its threshold for a query of your own"
        )
        self.metric = metric


def signal_metric(metric: str) -> SignalMetric:
    """The ``SignalMetric`` for a ``spec.autoscaling.metric`` value; ``UnknownMetricError`` otherwise."""
    try:
        return METRICS[metric]
    except KeyError:
        raise UnknownMetricError(metric) from None


def label_value(value: str) -> str:
    """``value`` as a PromQL string literal (double-quoted, backslash and quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def model_selector(*, namespace: str, model: str) -> str:
    """The label matchers of a model's server pods: ``{namespace="ns",model="m",component="server"}``."""
    return (
        f"{{{NAMESPACE_LABEL}={label_value(namespace)},{MODEL_LABEL}={label_value(model)},"
        f"{COMPONENT_LABEL}={label_value(COMPONENT_SERVER)}}}"
    )


def _per_pod(metric: SignalMetric, series_with_matchers: str, group_by: str) -> str:
    deduplicated = f"max by ({NAMESPACE_LABEL}, {POD_LABEL}, {ENGINE_LABEL}) ({series_with_matchers})"
    return f"{metric.per_pod} by ({group_by}) ({deduplicated})"


def per_pod_query(metric: str, *, namespace: str, model: str) -> str:
    """One series per server pod of the model (labels ``namespace``, ``pod``): each replica's signal."""
    return per_pod_query_matching(metric, model_selector(namespace=namespace, model=model))


def per_pod_query_matching(metric: str, selector: str) -> str:
    """``per_pod_query`` with label matchers of one's own (``{...}``, e.g. a dashboard's variables)."""
    m = signal_metric(metric)
    return _per_pod(m, m.vllm_series + selector, f"{NAMESPACE_LABEL}, {POD_LABEL}")


def keda_query(metric: str, *, namespace: str, model: str) -> str:
    """The KEDA Prometheus trigger's ``query``: the signal summed over the model's pods (one sample).

    Use with ``metricType: AverageValue`` and ``threshold`` = the per-replica target. With no pod
    reporting the result is empty, which KEDA reads as 0 (``ignoreNullValues``, its default).
    """
    return f"sum({per_pod_query(metric, namespace=namespace, model=model)})"


def average_per_replica_query(metric: str, *, namespace: str, model: str) -> str:
    """The signal averaged over the model's reporting pods: what the autoscaler compares with the target
    (for the dashboard's "scaling signal" panel and the alerts)."""
    return f"avg({per_pod_query(metric, namespace=namespace, model=model)})"


def average_per_replica_query_matching(metric: str, selector: str) -> str:
    """``average_per_replica_query`` over the pods ``selector`` matches (the dashboard's scaling-signal panel,
    with its ``$namespace``/``$model`` variables)."""
    return f"avg({per_pod_query_matching(metric, selector)})"


def adapter_metric_name(metric: str) -> str:
    """The custom-metrics API name prometheus-adapter serves for ``metric`` (the HPA's ``metric.name``):
    vLLM's series name with ``:`` turned into ``_`` (``vllm_num_requests_waiting``)."""
    return signal_metric(metric).vllm_series.replace(":", "_")


def adapter_metrics_query(metric: str) -> str:
    """prometheus-adapter's ``metricsQuery`` template for ``metric`` (Go template, ``<< >>`` delimiters)."""
    return _per_pod(signal_metric(metric), "<<.Series>>{<<.LabelMatchers>>}", "<<.GroupBy>>")


def adapter_rule(metric: str) -> dict[str, Any]:
    """One prometheus-adapter ``rules`` entry: a Pods metric per model server pod.

    ``seriesQuery`` finds vLLM's series of server pods; ``resources`` maps the monitors' ``namespace``
    and ``pod`` labels to Kubernetes objects; the HPA's pod list (the VLLMModel's ``status.selector``)
    narrows it to one model through ``<<.LabelMatchers>>``.
    """
    m = signal_metric(metric)
    return {
        "seriesQuery": f"{m.vllm_series}{{{NAMESPACE_LABEL}!=\"\",{POD_LABEL}!=\"\","
        f"{COMPONENT_LABEL}={label_value(COMPONENT_SERVER)}}}",
        "resources": {
            "overrides": {NAMESPACE_LABEL: {"resource": "namespace"}, POD_LABEL: {"resource": "pod"}},
        },
        "name": {"matches": f"^{m.vllm_series}$", "as": adapter_metric_name(metric)},
        "metricsQuery": adapter_metrics_query(metric),
    }


def adapter_rules() -> list[dict[str, Any]]:
    """The adapter rules for every signal, in ``METRICS`` order (the chart's ``prometheusAdapter.rules``)."""
    return [adapter_rule(name) for name in METRICS]


def render_adapter_query(
    metrics_query: str, *, series: str, label_matchers: Mapping[str, str], group_by: str = POD_LABEL
) -> str:
    """What prometheus-adapter sends to Prometheus for a ``metricsQuery`` (tests and ``render`` previews).

    ``label_matchers`` are exact-match labels, as the adapter builds them for a namespace; a value
    with ``|`` becomes a regex match, as the adapter does for a list of pods (``pod=~"a|b"``).
    """
    matchers = ",".join(
        f"{k}=~{label_value(v)}" if "|" in v else f"{k}={label_value(v)}" for k, v in label_matchers.items()
    )
    return (
        metrics_query.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )
