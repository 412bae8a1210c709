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
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kmock-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    passed: Counter[str] = Counter()
    failed: dict[str, list[int]] = defaultdict(list)
    slowest: dict[str, float] = {}
    runs: list[dict[str, Any]] = []
    with stressed(args.stressors):
        for index in range(1, args.runs + 1):
            code, seconds, cases = run_once(index, workdir, args.marker)
            load1 = os.getloadavg()[0]
            for test_id, (outcome, took) in cases.items():
                slowest[test_id] = max(slowest.get(test_id, 0.0), took)
                if outcome == "passed":
                    passed[test_id] += 1
                elif outcome != "skipped":
                    failed[test_id].append(index)
            bad = sum(1 for outcome, _ in cases.values() if outcome in ("failed", "error"))
            runs.append({"run": index, "exit": code, "seconds": round(seconds, 1), "tests": len(cases),
                         "failed": bad, "load1_after": round(load1, 2)})  # fmt: skip
            print(f"run {index}/{args.runs}: exit {code}, {len(cases)} tests, {bad} failed, {seconds:.0f} s, "
                  f"load {load1:.1f}", flush=True)  # fmt: skip
    tests = sorted(set(passed) | set(failed))
    report = {
        "command": "python bench/kmock_under_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": facts(workdir),
        "versions": versions(),
        "stressors": args.stressors,
        "runs": runs,
        "tests": len(tests),
        "all_passed_every_run": all(passed[t] == args.runs for t in tests) and bool(tests),
        "failures": {t: failed[t] for t in tests if failed[t]},
        "slowest_seconds": dict(sorted(slowest.items(), key=lambda kv: -kv[1])[:10]),
        "workdir": str(workdir),
    }
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if report["all_passed_every_run"] and all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
