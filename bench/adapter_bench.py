"""LoRA adapters: loading one into a running server vs restarting vLLM with it, and the warm check of a
cached adapter.

Caches the tiny generated model and two generated adapters (rank 8, the tiny Llama's attention projections)
from a loopback Hub with ``vllm-runtime cache --adapters-file``, then:

- **load while serving**: ``vllm-runtime serve --adapters-file F`` with adapter ``a1``; the file is replaced
  (atomic rename, as a ConfigMap volume update ends) with ``a1`` + ``a2``; timed from the write until the
  first completion on ``a2`` succeeds (the runtime polls the file every ``--poll`` s: that wait is included),
  plus the runtime's own figure (``loadSeconds`` in ``/status``: cache check + vLLM's load call). Then ``a2``
  is removed again (until it 404s) and re-added, ``--loads`` times;
- **restart with it**: the same server stopped (SIGTERM) and started again with ``a1`` + ``a2`` in the file,
  timed from the stop until the first completion on ``a2`` succeeds (warm compile cache, same flags);
- **warm check**: ``adapters.caching.cache_adapter`` on the cache that already holds ``a1``, in this process:
  its time, the Hub's file-content GETs, and the weight files it opens (patched ``open``/``os.open``).

    python bench/adapter_bench.py [--loads 5] [--restarts 1] [--out bench/adapter_results.json] [-- VLLM ARGS]
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from machine import facts, versions  # noqa: E402

from vllm_runtime import summary  # noqa: E402
from vllm_runtime.demo import CPU_ENV, RUNTIME, ServeProcess, complete, get_json  # noqa: E402
from vllm_runtime.devhub import tiny_adapter  # noqa: E402
from vllm_runtime.devhub.server import DevHub  # noqa: E402
from vllm_runtime.devhub.tiny_model import generate  # noqa: E402

BASE = "bench-org/tiny-llama"
ADAPTERS = {"a1": "bench-org/lora-a1", "a2": "bench-org/lora-a2"}
DEFAULT_VLLM_ARGS = ("--max-model-len", "256", "--enforce-eager")


def write_file(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"adapters": entries}))
    os.replace(tmp, path)


def answers(api: str, model: str) -> bool:
    try:
        complete(api, model, "Hello", max_tokens=1)
    except urllib.error.HTTPError:
        return False
    return True


def wait(what: str, check: Any, timeout: float, interval: float = 0.02) -> float:
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if check():
            return time.perf_counter() - began
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def load_seconds(server: ServeProcess, name: str) -> float | None:
    items = get_json(server.metrics + "/status").get("adapters", {}).get("items", [])
    return next((i.get("loadSeconds") for i in items if i["name"] == name and i.get("loaded")), None)


def warm_check(cache_dir: Path, hub: DevHub, entry_name: str) -> dict[str, Any]:
    from vllm_runtime.adapters import caching
    from vllm_runtime.adapters.desired import parse_adapters
    from vllm_runtime.cache import CacheOptions

    (entry,) = parse_adapters({"adapters": [{"name": entry_name, "model": ADAPTERS[entry_name]}]}, path="bench",
                              require_commit=False)  # fmt: skip
    opened: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def note(path: Any) -> None:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if text.endswith((".safetensors", ".bin")):
            opened.append(text)

    def counting_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_open(file, *a, **k)

    def counting_os_open(path: Any, *a: Any, **k: Any) -> int:
        note(path)
        return real_os_open(path, *a, **k)

    hub.clear_log()
    opts = CacheOptions(model=BASE, cache_dir=cache_dir, endpoint=hub.url)
    builtins.open, io.open, os.open = counting_open, counting_open, counting_os_open  # type: ignore[assignment]
    try:
        began = time.perf_counter()
        result = caching.cache_adapter(opts, entry)
        seconds = time.perf_counter() - began
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open  # type: ignore[assignment]
    assert "commit" in result, result
    return {"seconds": round(seconds, 4), "weight_files_opened": len(opened),
            "content_gets": len(hub.content_gets()), "hub_requests": len(hub.repo_requests())}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--poll", type=float, default=0.5, help="serve's --adapter-poll-interval")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    vllm_args = [a for a in args.vllm_args if a != "--"] or list(DEFAULT_VLLM_ARGS)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adapter-bench-"))
    cache_dir = work / "cache"
    load_before = os.getloadavg()
    with DevHub() as hub:
        hub.add_repo(BASE, generate(work / "model"))
        for i, (name, repo) in enumerate(ADAPTERS.items(), start=1):
            tiny_adapter.publish(hub, repo, work / "gen", seeds=(i,))
        wanted = work / "cache-adapters.json"
        write_file(wanted, [{"name": n, "model": r} for n, r in ADAPTERS.items()])
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
        env.pop("HF_TOKEN", None)
        term = work / "cache-summary.json"
        done = subprocess.run([*RUNTIME, "cache", "--model", BASE, "--cache-dir", str(cache_dir), "--adapters-file",
                               str(wanted), "--termination-message-path", str(term)],
                              env=env, capture_output=True, text=True)  # fmt: skip
        cached = summary.parse_termination_message(term.read_text() if term.exists() else None)
        if done.returncode != 0 or not cached:
            raise SystemExit(f"cache failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        commits = {e["name"]: e["commit"] for e in summary.adapter_entries(cached)}
        warm = [warm_check(cache_dir, hub, "a1") for _ in range(3)]

    def entry(name: str) -> dict[str, Any]:
        return {"name": name, "model": ADAPTERS[name], "commit": commits[name]}

    adapters_file = work / "adapters.json"
    serve_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")} | CPU_ENV

    def server(label: str) -> ServeProcess:
        return ServeProcess(model=BASE, revision="main", cache_dir=cache_dir, log_path=work / f"{label}.log",
                            vllm_args=vllm_args, env=serve_env,
                            serve_args=("--adapters-file", str(adapters_file), "--max-loras", "2", "--max-lora-rank",
                                        "8", "--adapter-poll-interval", str(args.poll)))  # fmt: skip

    write_file(adapters_file, [entry("a1")])
    first = server("serve-0").start()
    first_ready = first.wait_ready(timeout=args.timeout)
    wait("a1 answers", lambda: answers(first.api, "a1"), args.timeout, 0.2)
    loads: list[dict[str, float | None]] = []
    try:
        for _ in range(args.loads):
            began = time.perf_counter()
            write_file(adapters_file, [entry("a1"), entry("a2")])
            wait("a2 answers", lambda: answers(first.api, "a2"), 120)
            loads.append({"serving_seconds": time.perf_counter() - began, "load_seconds": load_seconds(first, "a2")})
            write_file(adapters_file, [entry("a1")])
            wait("a2 gone", lambda: not answers(first.api, "a2"), 120)
    finally:
        first.stop()
    restarts: list[float] = []
    previous = first
    for i in range(args.restarts):
        write_file(adapters_file, [entry("a1"), entry("a2")])
        began = time.perf_counter()
        previous.stop()
        again = server(f"serve-{i + 1}").start()
        try:
            again.wait_ready(timeout=args.timeout)
            wait("a2 answers after restart", lambda: answers(again.api, "a2"), args.timeout, 0.05)
            restarts.append(time.perf_counter() - began)
        finally:
            again.stop()
        previous = again
        write_file(adapters_file, [entry("a1")])

    serving = statistics.median(float(x["serving_seconds"] or 0) for x in loads)
    api_load = statistics.median(float(x["load_seconds"] or 0) for x in loads)
    restart = statistics.median(restarts)
    result = {
        "machine": facts(work), "versions": versions(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "vllm_args": vllm_args, "poll_interval": args.poll,
        "first_start_seconds": round(first_ready, 2), "loads": loads, "restarts": restarts, "warm_checks": warm,
        "median": {"load_while_serving_seconds": round(serving, 3), "runtime_load_seconds": round(api_load, 4),
                   "restart_with_adapter_seconds": round(restart, 2), "speedup": round(restart / serving, 1)},
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    m = result["median"]
    w = min(warm, key=lambda x: x["seconds"])
    print(json.dumps(result["median"]))
    print("\n| Measure | Value | Baseline (same run) | Ratio | Goal | Met |\n|---|---|---|---|---|---|")
    print(f"| new adapter serving, file written -> first completion (median of {len(loads)}, poll {args.poll} s) | "
          f"{m['load_while_serving_seconds']:.2f} s | restart vLLM with it: {m['restart_with_adapter_seconds']:.1f} s "
          f"(median of {len(restarts)}) | {m['speedup']:.0f}x faster | >= 10x | "
          f"{'yes' if m['speedup'] >= 10 else '**no**'} |")  # fmt: skip
    print(f"| of which the runtime's check + vLLM's load call (loadSeconds) | {m['runtime_load_seconds'] * 1000:.0f} ms "
          "| | | | |")
    print(f"| warm check of a cached adapter (best of {len(warm)}) | {w['seconds'] * 1000:.0f} ms | | | < 1 s | "
          f"{'yes' if w['seconds'] < 1 else '**no**'} |")  # fmt: skip
    print(f"| warm check: weight files opened / file-content GETs | {w['weight_files_opened']} / {w['content_gets']} "
          f"| Hub requests {w['hub_requests']} (revision -> commit) | | 0 | "
          f"{'yes' if w['weight_files_opened'] == 0 and w['content_gets'] == 0 else '**no**'} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
