"""The chart's alert rules, checked and unit-tested with promtool (Debian's prometheus package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from chart_render import VALUE_SETS, by_kind, one, render_objects

PROMTOOL = shutil.which("promtool")
UNIT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: run scripts/setup.sh (apt prometheus)")

ALERTS = {
    "VLLMModelNotReady", "VLLMModelFailed", "VLLMModelNotStarted", "VLLMModelCacheStalled", "VLLMModelCacheRetrying",
    "VLLMModelCacheVerificationFailed", "VLLMModelGPUMemoryNearFull", "VLLMModelKVCacheSaturated",
    "VLLMModelRequestsQueueing", "VLLMOperatorReconcileErrors", "VLLMModelAtMaxReplicas",
    "VLLMModelQueueGrowingWhileNotScaling", "VLLMModelAdapterNotLoaded",
}  # fmt: skip


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rules.yaml (the rendered PrometheusRule's groups) beside a copy of the unit tests."""
    directory = tmp_path_factory.mktemp("rules")
    rule = one(render_objects(VALUE_SETS["monitoring"]), "PrometheusRule")
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(UNIT_TESTS, directory / UNIT_TESTS.name)
    return directory


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    result = _promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout + result.stderr


def test_promtool_unit_tests_pass(rules_dir: Path) -> None:
    result = _promtool("test", "rules", UNIT_TESTS.name, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_the_asked_for_alerts_exist(rules_dir: Path) -> None:
    rules = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    defined = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert defined == ALERTS
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == ALERTS, f"alerts without a firing unit test: {ALERTS - tested}"
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_unit_tests_catch_a_broken_threshold(rules_dir: Path, tmp_path: Path) -> None:
    """The unit tests are not vacuous: loosen one threshold and they fail."""
    rule = one(render_objects({**VALUE_SETS["monitoring"], "prometheusRule": {
        "enabled": True, "alertLabels": {"team": "ml-platform"}, "gpuMemoryFraction": 0.995}}), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and "VLLMModelGPUMemoryNearFull" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "alert"),
    [
        ({"atMaxReplicasFor": "5m"}, "VLLMModelAtMaxReplicas"),  # the 10-minute peak would alert
        ({"queueGrowingAbove": 20}, "VLLMModelQueueGrowingWhileNotScaling"),  # "stuck" (16 waiting) would not
        ({"adapterNotLoadedFor": "20m"}, "VLLMModelAdapterNotLoaded"),  # "sql" would not alert by 12m
    ],
)
def test_autoscaling_alert_tests_catch_a_changed_rule(tmp_path: Path, values: dict[str, object], alert: str) -> None:
    rule_values = {**VALUE_SETS["monitoring"]["prometheusRule"], **values}
    rule = one(render_objects({**VALUE_SETS["monitoring"], "prometheusRule": rule_values}), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and alert in result.stdout + result.stderr


def test_queue_alert_needs_the_ready_pods_clause(rules_dir: Path, tmp_path: Path) -> None:
    """Without "no more ready pods than a window ago", the model that scales would alert too."""
    rules = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "VLLMModelQueueGrowingWhileNotScaling"]
    clauses = rule["expr"].split(" and on (namespace, model) ")
    assert len(clauses) == 4 and "offset 10m" in clauses[2]
    rule["expr"] = " and on (namespace, model) ".join(clauses[:2] + clauses[3:])
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and "scaling" in result.stdout + result.stderr


def test_rules_are_off_unless_asked_for() -> None:
    assert not by_kind(render_objects(), "PrometheusRule")
