"""The operator benchmark's request accounting and side-by-side table, on hand-made inputs (no operator run)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import operator_report as report  # noqa: E402

APPLY = "application/apply-patch+yaml"


@pytest.mark.parametrize(
    ("method", "action", "plural", "group", "sub", "ctype", "watch", "expected"),
    [
        ("GET", "FETCH", "vllmmodels", "vllm-operator.io", None, "", False, ("GET", "vllmmodels.vllm-operator.io")),
        ("GET", "LIST", "pods", "", None, "", False, ("LIST", "pods")),
        ("GET", "LIST", "pods", "", None, "", True, ("WATCH", "pods")),
        ("GET", "WATCH", "jobs", "batch", None, "", False, ("WATCH", "jobs.batch")),
        ("PATCH", "UPDATE", "jobs", "batch", None, APPLY, False, ("PATCH apply", "jobs.batch")),
        ("PATCH", "UPDATE", "vllmmodels", "vllm-operator.io", "status", "application/merge-patch+json", False,
         ("PATCH status", "vllmmodels.vllm-operator.io")),
        ("PATCH", "UPDATE", "vllmmodels", "vllm-operator.io", None, "application/merge-patch+json", False,
         ("PATCH other", "vllmmodels.vllm-operator.io")),
        ("POST", "CREATE", "events", "", None, "", False, ("Event POST", "events")),
        ("PATCH", "UPDATE", "events", "events.k8s.io", None, "", False, ("Event PATCH", "events.events.k8s.io")),
        ("POST", "CREATE", "services", "", None, "", False, ("POST", "services")),
        ("DELETE", "DELETE", "jobs", "batch", None, "", False, ("DELETE", "jobs.batch")),
        ("GET", None, None, None, None, "", False, ("discovery", "-")),
    ],
)  # fmt: skip
def test_every_request_has_one_verb(method: str, action: str | None, plural: str | None, group: str | None,
                                    sub: str | None, ctype: str, watch: bool, expected: tuple[str, str]) -> None:  # fmt: skip
    assert report.classify(method, action, plural, group, sub, ctype, watch) == expected


def test_per_model_list_is_a_list_naming_one_model() -> None:
    assert report.is_per_model_list("LIST", "app.kubernetes.io/managed-by=vllm-operator,vllm-operator.io/model=m1")
    assert not report.is_per_model_list("LIST", "app.kubernetes.io/managed-by=vllm-operator")
    assert not report.is_per_model_list("WATCH", "vllm-operator.io/model=m1")


def test_phase_summary_counts_reads_beyond_the_watches_per_model() -> None:
    before = {"WATCH pods": 1, "GET services": 2}
    after = {"WATCH pods": 3, "GET services": 6, "LIST jobs.batch": 4, "PATCH apply jobs.batch": 4}
    phase = report.load_summary(report.diff(after, before), {}, per_model_lists=4, models=4)
    assert phase["requests"] == {"GET services": 4, "LIST jobs.batch": 4, "PATCH apply jobs.batch": 4, "WATCH pods": 2}
    assert phase["by_verb"] == {"GET": 4, "LIST": 4, "WATCH": 2, "PATCH apply": 4}
    assert phase["reads_beyond_watches"] == 8 and phase["reads_beyond_watches_per_model"] == 2.0
    assert phase["total_per_model"] == 3.5 and phase["lists"] == 4 and phase["per_model_lists"] == 4


def test_slope_is_least_squares_per_unit() -> None:
    assert report.slope_per([(1000, 100.0), (2000, 102.0), (3000, 104.0)], 1000) == pytest.approx(2.0)
    assert report.slope_per([(1000, 100.0), (2000, 100.0)], 1000) == 0
    assert math.isnan(report.slope_per([(1000, 100.0)], 1000))


def _side(ready_p99: float, reads: float, gets: int) -> dict:
    burst = report.load_summary({"GET pods": gets, "PATCH apply jobs.batch": 10}, {}, 0, 10)
    burst["reads_beyond_watches_per_model"] = reads
    return {"load": {"latency": {"models": 5, "ready_p99_ms": ready_p99}, "burst": {"models": 10},
                     "api": {"burst": burst}}, "cycles": None}  # fmt: skip


def test_side_by_side_table_has_both_sides_the_ratio_and_the_goal() -> None:
    md = report.markdown([_side(400.0, 6.0, 60), _side(200.0, 0.0, 0)], ["before", "after"])
    lines = md.splitlines()
    assert lines[0] == "| Measure | before | after | ratio | Goal | Met (last) |"
    ready = next(line for line in lines if line.startswith("| create -> Ready, p99"))
    assert ready.split(" | ")[1:5] == ["400.0 ms", "200.0 ms", "0.50", "< 250 ms"] and ready.endswith("yes |")
    reads = next(line for line in lines if "reads beyond the watches" in line)
    assert "6.00" in reads and reads.endswith("yes |")
    assert "| GET pods | 6.00 | 0.00 | 0.00 |" in md  # per model, by verb and resource
    assert "| PATCH apply jobs.batch | 1.00 | 1.00 | 1.00 |" in md
    assert "cycles" not in md  # a scenario not run leaves no rows


def test_goal_missed_is_marked() -> None:
    md = report.markdown([_side(400.0, 6.0, 60)], ["only"])
    ready = next(line for line in md.splitlines() if line.startswith("| create -> Ready, p99"))
    assert ready.endswith("**no** |") and "ratio" not in md.splitlines()[0]
