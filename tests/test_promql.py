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
