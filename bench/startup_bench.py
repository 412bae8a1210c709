"""Time to healthy: ``vllm-runtime serve`` vs plain vLLM on the same cached model, cold vs warm compile cache.

Caches the tiny generated model (or ``--model``'s cached commit) once from a loopback Hub, then starts,
one after another and with the same vLLM flags:

- plain vLLM (``python -m vllm.entrypoints.openai.api_server``, HF_HUB_OFFLINE=1, HF_HUB_CACHE on the cache,
  VLLM_CACHE_ROOT in a fresh directory): cold, then warm (same directory);
- ``vllm-runtime serve`` on the same cache, compile directory emptied first: cold, then warm.

"Healthy" is the same probe for both: vLLM's /health answers and /v1/models lists the model, polled every
0.2 s from the moment the process is spawned. Each start is stopped with SIGTERM before the next.

    python bench/startup_bench.py [--rounds 1] [--out bench/startup_results.json] [-- VLLM ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_runtime import layout
from vllm_runtime.demo import CPU_ENV, DEFAULT_VLLM_ARGS, ServeProcess, cache_model, free_port, hub_env, loopback_hub
from vllm_runtime.metrics import fetch_text

PROBE_INTERVAL = 0.2


def healthy(api: str, model: str) -> bool:
    if fetch_text(api + "/health", timeout=2) is None:
        return False
    body = fetch_text(api + "/v1/models", timeout=2)
    return bool(body) and any(m.get("id") == model for m in json.loads(body or "{}").get("data", []))


def wait_healthy(proc: subprocess.Popen[bytes], api: str, model: str, started: float, timeout: float) -> float:
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before healthy")
        if healthy(api, model):
            return time.monotonic() - started
        time.sleep(PROBE_INTERVAL)
    raise TimeoutError("not healthy in time")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def plain_vllm(cache_dir: Path, model: str, commit: str, compile_root: Path, vllm_args: list[str], log: Path,
               timeout: float) -> float:  # fmt: skip
    port = free_port()
    env = {**os.environ, **CPU_ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(layout.CacheLayout(cache_dir).hub_cache),
           "VLLM_CACHE_ROOT": str(compile_root)}  # fmt: skip
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--revision", commit,
           "--host", "127.0.0.1", "--port", str(port), *vllm_args]  # fmt: skip
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        return wait_healthy(proc, f"http://127.0.0.1:{port}", model, started, timeout)
    finally:
        stop(proc)


def runtime_serve(cache_dir: Path, model: str, commit: str, vllm_args: list[str], log: Path,
                  timeout: float) -> dict[str, Any]:  # fmt: skip
    server = ServeProcess(model=model, revision=commit, cache_dir=cache_dir, log_path=log, vllm_args=vllm_args,
                          env={**os.environ, **CPU_ENV})  # fmt: skip
    server.start()
    assert server.proc is not None
    try:
        seconds = wait_healthy(server.proc, server.api, model, server.started_at, timeout)
        status_path = next((cache_dir / "state").glob("serve-*.json"))
        # /ready lags /health by up to one probe interval; wait for the status file to record "healthy".
        deadline = time.monotonic() + 10
        status = json.loads(status_path.read_text())
        while "healthy" not in status.get("phases", {}) and time.monotonic() < deadline:
            time.sleep(0.2)
            status = json.loads(status_path.read_text())
        return {"healthy_seconds": seconds, "phases": status["phases"], "compile_warm": status["compileCache"]["warm"]}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None)
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    vllm_args = [a for a in args.vllm_args if a != "--"] or list(DEFAULT_VLLM_ARGS)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="startup-bench-"))
    cache_dir = workdir / "cache"
    with loopback_hub(workdir) as (endpoint, commit):
        model = "demo-org/tiny-llama"
        cache_model(model=model, revision="main", cache_dir=cache_dir, env=hub_env(endpoint, workdir / "hf-home"))

    results: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        plain_root = workdir / f"plain-compile-{round_no}"
        shutil.rmtree(plain_root, ignore_errors=True)
        shutil.rmtree(layout.CacheLayout(cache_dir).compile_root, ignore_errors=True)
        row: dict[str, Any] = {"round": round_no, "order": "plain-first" if round_no % 2 == 0 else "serve-first"}

        def plain() -> None:
            for label in ("cold", "warm"):
                row[f"plain_{label}"] = plain_vllm(cache_dir, model, commit, plain_root, vllm_args,
                                                   workdir / f"plain-{label}.log", args.timeout)  # fmt: skip

        def served() -> None:
            for label in ("cold", "warm"):
                row[f"serve_{label}"] = runtime_serve(cache_dir, model, commit, vllm_args,
                                                      workdir / f"serve-{label}.log", args.timeout)  # fmt: skip

        # alternate which goes first, so a machine that gets busier or quieter favours neither
        for step in (plain, served) if round_no % 2 == 0 else (served, plain):
            step()
        results.append(row)
        print(json.dumps(row), flush=True)

    print("\n| start | plain vLLM | vllm-runtime serve |\n|---|---|---|")
    for label in ("cold", "warm"):
        plain = [r[f"plain_{label}"] for r in results]
        served = [r[f"serve_{label}"]["healthy_seconds"] for r in results]
        print(f"| {label} compile cache | {_fmt(plain)} | {_fmt(served)} |")
    report = {"vllm_args": vllm_args, "nproc": os.cpu_count(), "rounds": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.1f} s" for v in values)


if __name__ == "__main__":
    sys.exit(main())
