"""Run the kmock tests (the real operator against the emulated API) again and again while ``stress-ng``
keeps every core busy, and count how often each test passed.

Issue 10 asks for 10 passing runs of 10 under load: a timing assumption in a test (or a race in the
operator that only a slow machine shows) fails some of the runs long before it fails a quiet one.

    python bench/kmock_under_load.py --runs 10 --out bench/kmock_under_load_results.json

``stress-ng`` is Debian's (``apt-get install stress-ng``); it is not a test dependency, so it is not
installed by the project's setup. Each run is one ``pytest -m kmock`` process with a JUnit report; the
report says per test how many runs passed, the slowest duration, and the load average seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import REPO, facts, versions  # noqa: E402


@contextlib.contextmanager
def stressed(workers: int) -> Iterator[subprocess.Popen[bytes]]:
    """``stress-ng --cpu N`` for as long as the block runs."""
    exe = shutil.which("stress-ng")
    if exe is None:
        raise SystemExit("stress-ng is not installed: apt-get install stress-ng")
    proc = subprocess.Popen([exe, "--cpu", str(workers), "--cpu-method", "matrixprod", "--quiet"])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    """test id -> (passed | failed | error | skipped, seconds) from one JUnit report."""
    found: dict[str, tuple[str, float]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        found[test_id] = ({"failure": "failed"}.get(outcome, outcome), float(case.get("time") or 0))
    return found


def run_once(index: int, workdir: Path, marker: str) -> tuple[int, float, dict[str, tuple[str, float]]]:
    junit = workdir / f"run-{index:02d}.xml"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", marker, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    (workdir / f"run-{index:02d}.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode, seconds, outcomes(junit) if junit.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--stressors", type=int, default=os.cpu_count() or 2, help="stress-ng CPU workers")
    parser.add_argument("--marker", default="kmock", help="pytest -m expression (default kmock)")
    parser.add_argument("--workdir", type=Path, help="JUnit reports and logs (default: temporary)")
    parser.add_argument("--out", type=Path, help="write the JSON report here (again after every run)")
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: report the runs already in --workdir (an interrupted series)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarize and args.workdir is None:
        parser.error("--summarize needs --workdir")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kmock-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    results: list[dict[str, tuple[str, float]]] = []
    command = "python bench/kmock_under_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.summarize:
        for junit in sorted(workdir.glob("run-*.xml")):
            cases = outcomes(junit)
            results.append(cases)
            runs.append(_run_row(len(runs) + 1, None, None, cases, None))
        report = _report(command, args.stressors, workdir, runs, results)
    else:
        with stressed(args.stressors):
            for index in range(1, args.runs + 1):
                code, seconds, cases = run_once(index, workdir, args.marker)
                results.append(cases)
                runs.append(_run_row(index, code, seconds, cases, os.getloadavg()[0]))
                print(f"run {index}/{args.runs}: {runs[-1]}", flush=True)
                report = _report(command, args.stressors, workdir, runs, results)
                if args.out:
                    args.out.write_text(json.dumps(report, indent=1) + "\n")
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if report["all_passed_every_run"] and all(r["exit"] in (0, None) for r in runs) else 1


def _run_row(index: int, code: int | None, seconds: float | None, cases: dict[str, tuple[str, float]],
             load1: float | None) -> dict[str, Any]:  # fmt: skip
    bad = sum(1 for outcome, _ in cases.values() if outcome in ("failed", "error"))
    return {"run": index, "exit": code, "seconds": None if seconds is None else round(seconds, 1),
            "tests": len(cases), "failed": bad, "test_seconds": round(sum(t for _, t in cases.values()), 1),
            "load1_after": None if load1 is None else round(load1, 2)}  # fmt: skip


def _report(command: str, stressors: int, workdir: Path, runs: list[dict[str, Any]],
            results: list[dict[str, tuple[str, float]]]) -> dict[str, Any]:  # fmt: skip
    passed: Counter[str] = Counter()
    failed: dict[str, list[int]] = defaultdict(list)
    slowest: dict[str, float] = {}
    for index, cases in enumerate(results, start=1):
        for test_id, (outcome, took) in cases.items():
            slowest[test_id] = max(slowest.get(test_id, 0.0), took)
            if outcome == "passed":
                passed[test_id] += 1
            elif outcome != "skipped":
                failed[test_id].append(index)
    tests = sorted(set(passed) | set(failed))
    return {
        "command": command,
        "machine": facts(workdir),
        "versions": versions(),
        "stressors": stressors,
        "runs": runs,
        "tests": len(tests),
        "all_passed_every_run": bool(tests) and all(passed[t] == len(results) for t in tests),
        "failures": {t: failed[t] for t in tests if failed[t]},
        "slowest_seconds": dict(sorted(slowest.items(), key=lambda kv: -kv[1])[:10]),
        "workdir": str(workdir),
    }


if __name__ == "__main__":
    raise SystemExit(main())
