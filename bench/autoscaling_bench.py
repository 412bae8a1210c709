"""Autoscaling signals: how soon the autoscaler's query sees a load, and what the runtime's scrape costs.

Serves the tiny generated model (cached from a loopback Hub) with ``vllm-runtime serve`` on vLLM's CPU
build, one sequence at a time (``--max-num-seqs 1``, so concurrent requests queue), and starts Debian's
``prometheus`` on loopback scraping the runtime's ``/metrics`` every ``--scrape-interval`` s (5 s by
default) with the labels the chart's PodMonitor writes. Then:

- signal latency, ``--rounds`` times: from idle, a load of ``--concurrency`` requests starts at t0 (at
  phases spread over one scrape interval); the time until vLLM's own ``/metrics`` shows the queue above the
  target ("queue formed"), and until the exact query of the rendered KEDA ScaledObject, polled every 0.1 s
  through Prometheus's HTTP API, crosses the per-replica target ("query crossed"). Goal: under 2 scrape intervals. KEDA's own polling (15 s, the
  operator's pollingInterval) and the HPA's sync period come on top in a cluster; they are not measured.
- the scrape under load: with vLLM saturated, ``--scrapes`` sequential GETs of the runtime's ``/metrics``
  (runtime registry + vLLM's relayed), and as many of vLLM's own ``/metrics`` (what the relay costs on
  top). Goal: p99 under 100 ms. CPU: the CPU seconds of the runtime and vLLM's API server processes
  during the scraping, minus the same processes' CPU over an equally long saturated window without
  scrapes, per scrape, and as a share of one core at the scrape interval.

``--size tiny`` (the smoke test): the stand-in vLLM (tests/fake_vllm.py), no Prometheus, no load: the
scrape timing only; the signal latency is skipped and says so.

    .venv/bin/python bench/autoscaling_bench.py [--size full|tiny] [--rounds 5] [--scrapes 300]
                                                [--json FILE] [--markdown FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests"):  # bench.machine; the e2e test's Prometheus and load generator
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from bench import machine  # noqa: E402
from prometheus_fixtures import (  # noqa: E402
    POD_LABELS,
    SATURABLE_VLLM_ARGS,
    LoadGenerator,
    PrometheusServer,
    vllm_waiting,
    wait_until,
)

from vllm_operator import promql  # noqa: E402
from vllm_runtime.demo import CPU_ENV, ServeProcess, cache_model, hub_env, loopback_hub  # noqa: E402
from vllm_runtime.metrics import (  # noqa: E402
    RELAY_REFRESH_SECONDS,
    RELAY_WAIT_SECONDS,
    first_value,
    parse_exposition,
)

MODEL = "demo-org/tiny-llama"
TARGET = 2.0  # waiting requests per replica
SCRAPE_GOAL_MS = 100.0
POLL = 0.1
TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------- small measurements


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def timed_get(url: str, timeout: float = 30.0) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        body = resp.read()
    return (time.perf_counter() - started) * 1000, body


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15 of stat)


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Serving:
    """The processes whose CPU a scrape costs: the runtime (serve) and vLLM's API server (renders /metrics)."""

    runtime_pid: int
    api_server_pid: int | None

    @classmethod
    def of(cls, serve: ServeProcess) -> Serving:
        assert serve.proc is not None
        tree = process_tree(serve.proc.pid)
        api = next((p for p in tree[1:] if "api_server" in command_of(p) or "fake_vllm" in command_of(p)), None)
        return cls(serve.proc.pid, api)

    def cpu(self) -> dict[str, float]:
        out = {"runtime": cpu_seconds(self.runtime_pid)}
        if self.api_server_pid is not None:
            out["vllm_api_server"] = cpu_seconds(self.api_server_pid)
        return out


RELAY_AGE = "vllm_runtime_vllm_metrics_age_seconds"


def scrape_series(url: str, count: int, ages: list[float] | None = None) -> list[float]:
    """``count`` sequential GETs' milliseconds; with ``ages``, also each body's relayed-read age (s)."""
    out = []
    for _ in range(count):
        ms, body = timed_get(url)
        out.append(ms)
        if ages is not None:
            age = first_value(parse_exposition(body.decode()), RELAY_AGE)
            ages.append(math.nan if age is None else age)
    return out


def summarize_ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": percentile(values, 0.5), "p90_ms": percentile(values, 0.9),
            "p99_ms": percentile(values, 0.99), "max_ms": max(values) if values else math.nan}  # fmt: skip


def scrape_cost(serve: ServeProcess, vllm_metrics: str | None, scrapes: int, scrape_interval: float) -> dict[str, Any]:
    """Timings of the runtime's and vLLM's /metrics, and the CPU the runtime's scrapes cost (see the module doc)."""
    procs = Serving.of(serve)
    runtime_url = serve.metrics + "/metrics"
    scrape_series(runtime_url, 5)  # warm up connections and caches
    before = procs.cpu()
    started = time.monotonic()
    ages: list[float] = []
    runtime_ms = scrape_series(runtime_url, scrapes, ages)
    window = time.monotonic() - started
    during = procs.cpu()
    idle_start = procs.cpu()
    idle_deadline = time.monotonic() + window
    while time.monotonic() < idle_deadline:  # the same processes, as long, without scrapes
        time.sleep(min(0.2, max(0.0, idle_deadline - time.monotonic())))
    idle_end = procs.cpu()
    extra = {k: (during[k] - before[k]) - (idle_end[k] - idle_start[k]) for k in during}
    per_scrape_ms = sum(extra.values()) / scrapes * 1000
    result: dict[str, Any] = {
        "runtime": summarize_ms(runtime_ms),
        "window_s": window,
        "cpu_during_s": {k: during[k] - before[k] for k in during},
        "cpu_idle_s": {k: idle_end[k] - idle_start[k] for k in idle_end},
        "extra_cpu_ms_per_scrape": per_scrape_ms,
        "extra_cpu_core_share_at_interval": per_scrape_ms / 1000 / scrape_interval,
        "body_bytes": len(timed_get(runtime_url)[1]),
    }
    if vllm_metrics is not None:  # how old the relayed vLLM read was (see VllmMetricsRelay)
        known = [a for a in ages if not math.isnan(a)]
        result["relay_age"] = {"n": len(known), "p50_s": percentile(known, 0.5), "p99_s": percentile(known, 0.99),
                               "max_s": max(known) if known else math.nan,
                               "earlier_read_share": sum(a > RELAY_WAIT_SECONDS for a in known) / max(1, len(known))}  # fmt: skip
    if vllm_metrics is not None:
        direct_before, direct_started = procs.cpu(), time.monotonic()
        result["vllm_direct"] = summarize_ms(scrape_series(vllm_metrics + "/metrics", scrapes))
        direct_window, direct_after = time.monotonic() - direct_started, procs.cpu()
        idle_rate = sum(idle_end[k] - idle_start[k] for k in idle_end) / window if window else 0.0
        per_read_ms = (sum(direct_after[k] - direct_before[k] for k in direct_after)
                       - idle_rate * direct_window) / scrapes * 1000  # fmt: skip
        # The relay's refresher reads vLLM once per refresh period while scraped: its cost is one such read.
        result["vllm_read_cpu_ms"] = per_read_ms
        result["refresher_core_share"] = per_read_ms / 1000 / RELAY_REFRESH_SECONDS
    return result


# ----------------------------------------------------------------------------------- signal latency


def signal_round(
    prometheus: PrometheusServer, query: str, api: str, concurrency: int, phase: float
) -> dict[str, float]:
    """One load from idle: seconds to the queue forming in vLLM and to the query crossing the target.

    ``phase`` (s): how long after idle is seen (just after a scrape) the load starts, so that the rounds
    sample the scrape cycle instead of all starting right after a scrape (which would measure about one
    whole interval every time)."""
    wait_until(lambda: (prometheus.scalar(query) or 0.0) == 0.0 and vllm_waiting(api) == 0.0, timeout=120,
               interval=POLL, what="idle before the round")  # fmt: skip
    time.sleep(phase)
    load = LoadGenerator(api, MODEL, concurrency=concurrency, max_tokens=48, deadline_s=120)
    formed: float | None = None
    with load:
        t0 = load.started_at
        while True:
            now = time.monotonic()
            if now - t0 > 60:
                raise TimeoutError(f"query {query!r} did not cross {TARGET} within 60 s")
            if formed is None and vllm_waiting(api) > TARGET:
                formed = time.monotonic() - t0
            value = prometheus.scalar(query) or 0.0
            if value > TARGET:
                crossed = time.monotonic() - t0
                break
            time.sleep(POLL)
        load.stop_sending()
    if formed is None:
        formed = crossed  # the queue formed between two polls of vLLM and Prometheus saw it first
    if load.errors:
        raise RuntimeError(f"load errors: {load.errors[:3]}")
    return {"queue_formed_s": formed, "query_crossed_s": crossed, "value_at_cross": value}


# ----------------------------------------------------------------------------------- servers


@dataclass
class FakeServe(ServeProcess):
    """``vllm-runtime serve`` of the stand-in vLLM (tests/fake_vllm.py): the tiny size."""

    def command(self) -> list[str]:
        cmd = super().command()
        cut = cmd.index("--")
        fake = f"{sys.executable} {REPO / 'tests' / 'fake_vllm.py'}"
        return [*cmd[:cut], "--vllm-command", fake, *cmd[cut:]]


@contextmanager
def served(size: str, workdir: Path) -> Iterator[ServeProcess]:
    cache_dir = workdir / "cache"
    if size == "tiny":
        from test_serve_unit import COMMIT, REPO as FAKE_REPO, fill_cache_by_hand

        fill_cache_by_hand(cache_dir, FAKE_REPO, COMMIT)
        serve: ServeProcess = FakeServe(model=FAKE_REPO, revision=COMMIT, cache_dir=cache_dir,
                                        log_path=workdir / "serve.log", vllm_args=())  # fmt: skip
        timeout = 120.0
    else:
        with loopback_hub(workdir, MODEL) as (endpoint, _):
            cached = cache_model(model=MODEL, revision="main", cache_dir=cache_dir,
                                 env=hub_env(endpoint, workdir / "hf-home"))  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")}
        serve = ServeProcess(model=MODEL, revision=str(cached["commit"]), cache_dir=cache_dir,
                             log_path=workdir / "serve.log", vllm_args=SATURABLE_VLLM_ARGS,
                             env={**env, **CPU_ENV})  # fmt: skip
        timeout = 900.0
    serve.start()
    try:
        serve.wait_ready(timeout=timeout)
        yield serve
    finally:
        serve.stop()


def prometheus_version() -> str:
    try:
        out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not installed"


# ----------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="autoscaling-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "autoscaling",
        "size": args.size,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.facts(workdir),
        "versions": {**machine.versions(), "prometheus": prometheus_version()},
        "settings": {"scrape_interval_s": args.scrape_interval, "target_per_replica": TARGET,
                     "concurrency": args.concurrency, "rounds": args.rounds, "scrapes": args.scrapes,
                     "vllm_args": list(SATURABLE_VLLM_ARGS) if args.size == "full" else []},  # fmt: skip
    }
    progress(f"serving ({args.size}) in {workdir}")
    with served(args.size, workdir) as serve:
        if args.size == "tiny":
            results["signal"] = {"skipped": "tiny size: the stand-in vLLM has no queue (run --size full)"}
            results["scrape"] = {"idle": scrape_cost(serve, None, args.scrapes, args.scrape_interval)}
            return results
        query = promql.keda_query("queueDepth", namespace=POD_LABELS["namespace"], model=POD_LABELS["model"])
        results["settings"]["query"] = query
        prometheus = PrometheusServer([serve.metrics.removeprefix("http://")], POD_LABELS,
                                      scrape_interval=args.scrape_interval).start()  # fmt: skip
        try:
            wait_until(prometheus.targets_up, timeout=60, what="prometheus scraping the runtime")
            rounds = []
            phases = random.Random(11).sample(range(args.rounds), args.rounds)  # spread over one interval
            for n in range(args.rounds):
                phase = (phases[n] + 0.5) / args.rounds * args.scrape_interval
                rounds.append({"phase_s": phase, **signal_round(prometheus, query, serve.api, args.concurrency, phase)})
                progress(f"signal round {n + 1}/{args.rounds}: {rounds[-1]}")
        finally:
            prometheus.stop()
        crossed = [r["query_crossed_s"] for r in rounds]
        results["signal"] = {
            "rounds": rounds,
            "query_crossed_p50_s": statistics.median(crossed),
            "query_crossed_max_s": max(crossed),
            "queue_formed_p50_s": statistics.median(r["queue_formed_s"] for r in rounds),
            "goal_s": 2 * args.scrape_interval,
            "met": max(crossed) < 2 * args.scrape_interval,
        }
        # The scrape, idle and saturated (a queue the whole time: all but one request wait).
        idle = scrape_cost(serve, serve.api, args.scrapes, args.scrape_interval)
        progress(f"scrape idle: {idle['runtime']}")
        load = LoadGenerator(serve.api, MODEL, concurrency=args.concurrency, max_tokens=200, deadline_s=600)
        with load:
            wait_until(lambda: vllm_waiting(serve.api) >= args.concurrency - 2, timeout=60, what="vLLM saturated")
            saturated = scrape_cost(serve, serve.api, args.scrapes, args.scrape_interval)
            samples = parse_exposition(timed_get(serve.metrics + "/metrics")[1].decode())
            saturated["still_saturated"] = {
                "running": first_value(samples, "vllm:num_requests_running"),
                "waiting": first_value(samples, "vllm:num_requests_waiting"),
            }
            load.stop_sending()
        if load.errors:
            raise RuntimeError(f"load errors: {load.errors[:3]}")
        progress(f"scrape saturated: {saturated['runtime']}")
        results["scrape"] = {"idle": idle, "saturated": saturated, "goal_p99_ms": SCRAPE_GOAL_MS,
                             "met": saturated["runtime"]["p99_ms"] < SCRAPE_GOAL_MS}  # fmt: skip
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section, from the results alone."""
    s = results["settings"]
    lines = [
        f"Run {results['date']}, size {results['size']}, commit {results['machine'].get('Commit')}: `{command}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in results["machine"].items() if k != "Commit") + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(results["versions"].items())) + ".",
        "",
        "| measure | value | goal | met |",
        "|---|---|---|---|",
    ]
    sig = results["signal"]
    if "skipped" in sig:
        lines.append(f"| signal latency | skipped: {sig['skipped']} | | |")
    else:
        goal = f"< {sig['goal_s']:.0f} s (2 scrape intervals)"
        met = "yes" if sig["met"] else "**no**"
        lines += [
            f"| load start -> KEDA query above target, median of {len(sig['rounds'])} | "
            f"{sig['query_crossed_p50_s']:.2f} s | {goal} | |",
            f"| load start -> KEDA query above target, worst | {sig['query_crossed_max_s']:.2f} s | {goal} | {met} |",
            f"| load start -> queue above target in vLLM's own /metrics, median | {sig['queue_formed_p50_s']:.2f} s "
            "| | |",
        ]
    for state, scrape in results["scrape"].items():
        if not isinstance(scrape, dict):
            continue
        rt = scrape["runtime"]
        met = ""
        if state == "saturated":
            met = "yes" if results["scrape"]["met"] else "**no**"
        lines.append(f"| runtime /metrics, {state}: p50 / p99 / max of {rt['n']} | {rt['p50_ms']:.1f} / "
                     f"{rt['p99_ms']:.1f} / {rt['max_ms']:.1f} ms | p99 < {SCRAPE_GOAL_MS:.0f} ms | {met} |")  # fmt: skip
        if "vllm_direct" in scrape:
            d = scrape["vllm_direct"]
            lines.append(f"| vLLM's own /metrics, {state}: p50 / p99 (what the relay adds to) | "
                         f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f} ms | | |")  # fmt: skip
        if "relay_age" in scrape:
            a = scrape["relay_age"]
            lines.append(f"| age of the relayed vLLM read, {state}: p50 / p99 / max; scrapes given an earlier read | "
                         f"{a['p50_s']:.3f} / {a['p99_s']:.3f} / {a['max_s']:.3f} s; "
                         f"{a['earlier_read_share'] * 100:.0f} % | | |")  # fmt: skip
        if "refresher_core_share" in scrape:
            lines.append(f"| the relay's refresher, {state}: one vLLM /metrics read per second, CPU per read | "
                         f"{scrape['vllm_read_cpu_ms']:.2f} ms = {scrape['refresher_core_share'] * 100:.3f} % of "
                         "a core | | |")  # fmt: skip
        share = scrape["extra_cpu_core_share_at_interval"] * 100
        lines.append(f"| extra CPU per runtime scrape, {state} (runtime + vLLM API server) | "
                     f"{scrape['extra_cpu_ms_per_scrape']:.2f} ms = {share:.3f} % of a core at a "
                     f"{s['scrape_interval_s']:g} s interval | | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.size == "tiny":
        args.rounds, args.scrapes = 0, min(args.scrapes, 30)
    results = run(args, lambda line: print(line, file=sys.stderr, flush=True))
    text = json.dumps(results, indent=2, sort_keys=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    command = "python bench/autoscaling_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(results, command.strip())
    if args.markdown:
        Path(args.markdown).write_text(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
