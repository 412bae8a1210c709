"""Smoke check of the benchmarks: each runs once at the tiny size and yields figures of sane types and units.

Never asserts timings (those go to BENCHMARKS.md); only that the runner works from its one command and that
every figure is a finite, non-negative number with a known unit. The vLLM start-up benchmark is skipped at
the tiny size (the e2e tests start vLLM already), and the runner says so.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import scaling_model  # noqa: E402

UNITS = {"ms", "s", "MB", "B", "B/s", "count", "reconciles", "requests"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out, raw = tmp / "BENCHMARKS.md", tmp / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--size", "tiny", "--out", str(out), "--json", str(raw),
         "--workdir", str(tmp / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(raw.read_text()), out.read_text()


def test_every_benchmark_yields_figures(tiny_run: tuple[dict, str]) -> None:
    results, _ = tiny_run
    benchmarks = {f["benchmark"] for f in results["figures"]}
    assert benchmarks == {"operator", "cache"}
    assert "skipped" in results["startup"] and "tiny" in results["startup"]["skipped"]
    for figure in results["figures"]:
        assert figure["unit"] in UNITS, figure
        assert isinstance(figure["value"], int | float) and math.isfinite(figure["value"]), figure
        assert figure["value"] >= 0, figure
        if figure["ratio"] is not None:
            assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0, figure
        assert figure["met"] in (None, True, False)


def test_operator_figures_cover_latency_burst_and_memory(tiny_run: tuple[dict, str]) -> None:
    op = tiny_run[0]["operator"]
    assert op["burst"]["reconciled"] == op["burst"]["models"] and not op["burst"]["timed_out"]
    assert op["latency"]["first_p50_ms"] <= op["latency"]["first_p99_ms"]
    assert op["latency"]["first_p50_ms"] <= op["latency"]["ready_p50_ms"]  # Ready comes after the first pass
    assert 10 < op["memory"]["rss_loaded_mb"] < 4096
    assert op["reconciles"]["per_model"] >= 1  # read from the operator's own /metrics


def test_operator_api_load_is_counted_per_phase(tiny_run: tuple[dict, str]) -> None:
    api = tiny_run[0]["operator"]["api"]
    # kopf opens its watches at start-up, and every model gets its four children applied in the burst.
    assert api["startup"]["by_verb"]["WATCH"] >= 5
    burst = api["burst"]
    assert burst["models"] == tiny_run[0]["operator"]["burst"]["models"]
    for child in ("persistentvolumeclaims", "jobs.batch", "deployments.apps", "services"):
        assert burst["requests"][f"PATCH apply {child}"] >= burst["models"], child
    assert burst["by_verb"]["PATCH status"] >= burst["models"]
    assert sum(burst["by_verb"].values()) == burst["total"]
    assert burst["reads_beyond_watches"] == burst["by_verb"].get("GET", 0) + burst["by_verb"].get("LIST", 0)
    # The bench's own POSTs of VLLMModels are not the operator's load.
    assert not any(key.startswith("POST vllmmodels") for key in burst["requests"])


def test_operator_create_delete_cycles_sample_memory(tiny_run: tuple[dict, str]) -> None:
    cycles = tiny_run[0]["operator"]["cycles"]
    assert cycles["cycles"] == 50 and cycles["not_ready"] == 0
    samples = cycles["rss_samples_mb"]
    assert [s[0] for s in samples] == list(range(0, 51, 10))  # at the start, then every tenth (batch of 10)
    assert cycles["rss_max_mb"] == pytest.approx(max(s[1] for s in samples), abs=0.1)  # samples: 0.1 MB
    assert math.isfinite(cycles["slope_mb_per_1000"])
    assert cycles["api"]["requests"]["PATCH apply jobs.batch"] >= 50  # every cycle's model was reconciled
    assert "## Operator, side by side" in tiny_run[1]


def test_warm_cache_check_reads_metadata_only(tiny_run: tuple[dict, str]) -> None:
    warm = tiny_run[0]["cache"]["checks"]["warm"]
    for size in ("small", "large"):
        assert warm[size]["reused"] is True
        assert warm[size]["weight_file_opens"] == 0
        assert warm[size]["hub"]["content_gets"] == 0
    assert warm["large"]["model_bytes"] > 10 * warm["small"]["model_bytes"]
    assert tiny_run[0]["cache"]["checks"]["reverify"]["mismatches"] == 0


def test_report_has_machine_versions_table_and_scaling(tiny_run: tuple[dict, str]) -> None:
    _, markdown = tiny_run
    for needle in ("## Machine", "- CPU:", "- Memory:", "- OS:", "- Python:", "kopf", "huggingface_hub",
                   "| Benchmark | Measure |", "## Scaling sketch"):  # fmt: skip
        assert needle in markdown, needle


def test_scaling_model_shared_cache_pulls_once() -> None:
    a = scaling_model.Assumptions()
    rows = scaling_model.table({"m": 16e9}, [1, 8], a)
    assert [r["hub_bytes_shared"] for r in rows] == [16e9, 16e9]
    assert [r["hub_bytes_each"] for r in rows] == [16e9, 128e9]
    one, eight = rows
    assert eight["shared"]["load"] > one["shared"]["load"]  # N readers share the volume's throughput
    assert eight["each"]["download"] >= one["each"]["download"]  # N clients share the cluster's egress


def test_autoscaling_bench_runs_at_the_tiny_size(tmp_path: Path) -> None:
    """bench/autoscaling_bench.py: the scrape timing and CPU accounting against the stand-in vLLM (the signal
    latency needs real vLLM and is skipped, saying so); figures finite, the Markdown section from them."""
    raw, section = tmp_path / "autoscaling.json", tmp_path / "autoscaling.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "autoscaling_bench.py"), "--size", "tiny", "--json", str(raw),
         "--markdown", str(section), "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(raw.read_text())
    assert "skipped" in results["signal"] and "full" in results["signal"]["skipped"]
    idle = results["scrape"]["idle"]
    runtime = idle["runtime"]
    assert runtime["n"] == 30
    assert 0 < runtime["p50_ms"] <= runtime["p90_ms"] <= runtime["p99_ms"] <= runtime["max_ms"]
    assert idle["body_bytes"] > 0 and idle["window_s"] > 0
    assert set(idle["cpu_during_s"]) == {"runtime", "vllm_api_server"}  # the fake vLLM found in serve's tree
    assert math.isfinite(idle["extra_cpu_ms_per_scrape"]) and math.isfinite(idle["extra_cpu_core_share_at_interval"])
    text = section.read_text()
    assert "runtime /metrics, idle" in text and "prometheus" in text and results["machine"]["Commit"] in text


def test_autoscaling_bench_percentile_matches_numpy_default() -> None:
    from bench.autoscaling_bench import percentile

    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0, 1.0, 3.0], 0.99) == pytest.approx(4.96)
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))
