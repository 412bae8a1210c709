"""The autoscaling PromQL contract (vllm_operator.promql): exact strings, so a change is a decision.

Whether the strings mean what they say is proven against a real Prometheus scraping real vLLM in
tests/test_autoscaling_prometheus.py; ``promtool`` (Debian's prometheus package) checks the syntax here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vllm_operator import promql

SEL = '{namespace="llm",model="tiny",component="server"}'
CHART = Path(__file__).parents[1] / "charts/vllm-operator"


def test_model_selector_uses_the_monitors_relabelled_labels() -> None:
    assert promql.model_selector(namespace="llm", model="tiny") == SEL
    chart = (Path(__file__).parents[1] / "charts/vllm-operator/templates/_helpers.tpl").read_text()
    relabel = chart.split('define "vllm-operator.modelRelabelings"', 1)[1].split("{{- end }}", 1)[0]
    for label in (promql.MODEL_LABEL, promql.COMPONENT_LABEL, promql.POD_LABEL):
        assert f"targetLabel: {label}\n" in relabel, label  # the chart's monitors write exactly these


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("queueDepth",
         f"sum(sum by (namespace, pod) (max by (namespace, pod, engine) (vllm:num_requests_waiting{SEL})))"),
        ("runningRequests",
         f"sum(sum by (namespace, pod) (max by (namespace, pod, engine) (vllm:num_requests_running{SEL})))"),
        ("kvCacheUsage",
         f"sum(avg by (namespace, pod) (max by (namespace, pod, engine) (vllm:kv_cache_usage_perc{SEL})))"),
    ],
)  # fmt: skip
def test_keda_query_sums_the_per_pod_signal_over_the_model(metric: str, expected: str) -> None:
    assert promql.keda_query(metric, namespace="llm", model="tiny") == expected


def test_per_pod_and_average_queries() -> None:
    per_pod = promql.per_pod_query("queueDepth", namespace="llm", model="tiny")
    assert per_pod == f"sum by (namespace, pod) (max by (namespace, pod, engine) (vllm:num_requests_waiting{SEL}))"
    assert promql.average_per_replica_query("queueDepth", namespace="llm", model="tiny") == f"avg({per_pod})"


def test_label_values_are_escaped() -> None:
    assert promql.label_value('a"b\\c') == '"a\\"b\\\\c"'
    assert 'model="x\\"y"' in promql.model_selector(namespace="n", model='x"y')


def test_unknown_metric_is_a_typed_error_naming_the_field_and_the_choices() -> None:
    with pytest.raises(promql.UnknownMetricError, match=r"spec\.autoscaling\.metric 'gpuUtil'.*queueDepth.*prometheusQuery"):
        promql.keda_query("gpuUtil", namespace="n", model="m")


def test_adapter_rule_for_queue_depth() -> None:
    assert promql.adapter_rule("queueDepth") == {
        "seriesQuery": 'vllm:num_requests_waiting{namespace!="",pod!="",component="server"}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^vllm:num_requests_waiting$", "as": "vllm_num_requests_waiting"},
        "metricsQuery": "sum by (<<.GroupBy>>) (max by (namespace, pod, engine) (<<.Series>>{<<.LabelMatchers>>}))",
    }
    assert [r["name"]["as"] for r in promql.adapter_rules()] == [
        "vllm_num_requests_waiting", "vllm_num_requests_running", "vllm_kv_cache_usage_perc",
    ]  # fmt: skip
    assert promql.adapter_rule("kvCacheUsage")["metricsQuery"].startswith("avg by (<<.GroupBy>>) ")


def test_adapter_query_renders_as_prometheus_adapter_does() -> None:
    rendered = promql.render_adapter_query(
        promql.adapter_metrics_query("queueDepth"),
        series="vllm:num_requests_waiting",
        label_matchers={"namespace": "llm", "pod": "a|b"},
    )
    assert rendered == (
        'sum by (pod) (max by (namespace, pod, engine) (vllm:num_requests_waiting{namespace="llm",pod=~"a|b"}))'
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) not installed")
def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    exprs = []
    for metric in promql.METRICS:
        exprs += [
            promql.keda_query(metric, namespace="llm", model="tiny"),
            promql.average_per_replica_query(metric, namespace="llm", model="tiny"),
            promql.render_adapter_query(
                promql.adapter_metrics_query(metric), series=promql.METRICS[metric].vllm_series,
                label_matchers={"namespace": "llm", "pod": "p1|p2"},
            ),
            promql.adapter_rule(metric)["seriesQuery"],
        ]  # fmt: skip
    rules = {"groups": [{"name": "q", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the chart's prometheus-adapter rules ------------------------------------------------------------


def test_chart_adapter_rules_are_the_promql_modules() -> None:
    """values.yaml carries the rules as values (a user may edit them); by default exactly promql.adapter_rules()."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["prometheusAdapter"]["enabled"] is False  # off by default
    assert values["prometheusAdapter"]["rules"] == promql.adapter_rules()


def test_chart_renders_the_adapter_rules_in_prometheus_adapters_config_format() -> None:
    from chart_render import by_kind, render_objects

    assert not [c for c in by_kind(render_objects(), "ConfigMap") if c["metadata"]["name"].endswith("-adapter-rules")]
    objects = render_objects({"prometheusAdapter": {"enabled": True, "namespace": "monitoring"}})
    (configmap,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-adapter-rules")]
    assert configmap["metadata"]["namespace"] == "monitoring"  # where prometheus-adapter runs
    import kubernetes_validate
    from test_chart import KUBERNETES_VERSIONS

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(configmap, version, strict=True)
    config = yaml.safe_load(configmap["data"]["config.yaml"])  # prometheus-adapter's --config file
    assert config == {"rules": promql.adapter_rules()}
    # Every HPA metric name the operator can write is served by one rule.
    served = {rule["name"]["as"] for rule in config["rules"]}
    assert served == {promql.adapter_metric_name(m) for m in promql.METRICS}


def test_dashboard_shows_desired_vs_current_replicas_and_the_scaling_signal() -> None:
    import json

    dashboard = json.loads((CHART / "files/dashboards/vllm-models.json").read_text())
    panels = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}
    replicas = " ".join(panels["Replicas: desired vs current"])
    for gauge in ("desired", "current", "max"):
        assert f"vllm_operator_autoscaling_{gauge}_replicas" in replicas
    server = '{namespace=~"$namespace", model="$model", component="server"}'
    assert panels["Scaling signal per replica"] == [
        promql.average_per_replica_query_matching(m, server) for m in ("queueDepth", "runningRequests", "kvCacheUsage")
    ]
    # The same per-pod signal as the ScaledObject's query, with the dashboard's variables for the model.
    keda = promql.keda_query("queueDepth", namespace="NS", model="M")
    assert panels["Scaling signal per replica"][0].removeprefix("avg(") == keda.removeprefix("sum(").replace(
        '{namespace="NS",model="M",component="server"}', server)


def test_operator_exports_the_replica_gauges_the_alerts_and_dashboard_read() -> None:
    import prometheus_client

    from vllm_operator import metrics
    from vllm_runtime.metrics import parse_exposition

    def gauges() -> dict[str, list[tuple[dict[str, str], float]]]:
        samples = parse_exposition(prometheus_client.generate_latest().decode())
        # Only this test's model: the registry is the process's, other tests' models may be in it.
        mine = ("namespace", "llm"), ("model", "chat")
        return {k: [(l, v) for l, v in series if all(dict(l).get(a) == b for a, b in mine)]
                for k, series in samples.items() if k.startswith("vllm_operator_autoscaling_")}

    summary = {"engine": "keda", "minReplicas": 1, "maxReplicas": 4, "desiredReplicas": 3, "currentReplicas": 2}
    metrics.set_autoscaling("llm", "chat", summary)
    metrics.set_autoscaling("llm", "plain", None)  # no autoscaling: no series
    labels = {"namespace": "llm", "model": "chat"}
    assert gauges() == {
        "vllm_operator_autoscaling_desired_replicas": [(labels, 3.0)],
        "vllm_operator_autoscaling_current_replicas": [(labels, 2.0)],
        "vllm_operator_autoscaling_min_replicas": [(labels, 1.0)],
        "vllm_operator_autoscaling_max_replicas": [(labels, 4.0)],
    }
    metrics.set_autoscaling("llm", "chat", {**summary, "desiredReplicas": 4})
    assert gauges()["vllm_operator_autoscaling_desired_replicas"] == [(labels, 4.0)]
    metrics.set_autoscaling("llm", "chat", None)  # autoscaling turned off: the series go
    assert all(not v for v in gauges().values())
    metrics.set_autoscaling("llm", "chat", summary)
    metrics.forget("llm", "chat")  # the model deleted
    assert all(not v for v in gauges().values())


def test_operator_service_monitor_keeps_the_models_namespace_label() -> None:
    """The replica gauges name the VLLMModel's namespace; Prometheus would rename it exported_namespace."""
    from chart_render import VALUE_SETS, by_kind, render_objects

    monitors = by_kind(render_objects(VALUE_SETS["monitoring"]), "ServiceMonitor")
    (operator,) = [m for m in monitors if not m["metadata"]["name"].endswith("-models")]
    assert [e["honorLabels"] for e in operator["spec"]["endpoints"]] == [True]
