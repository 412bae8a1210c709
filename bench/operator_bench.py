"""The operator against an emulated API server: per-model latency, a 1,000-model burst, resident memory.

Set-up (two processes on the same machine, sharing its cores):

- this process: the project's kmock API emulator (``tests/kube_emulator.py``: apply, status subresource,
  owner GC, a Job controller whose pod finishes ~0.1 s after the Job is created with a cache summary, a
  Deployment controller that reports all replicas ready ~0.05 s after a spec change, a PVC binder), served
  over loopback HTTP. Lists honour ``labelSelector`` here, as a real API server does (kmock ignores it,
  which would make every reconcile list every model's Jobs and Pods: an emulator artefact, not the
  operator's cost). Each write is time-stamped as the emulator answers it.
- a child process: the real operator (``runner.operator_task``, kopf with the project's handlers and
  settings, unchanged), logged at INFO to a file. Its resident memory is read from outside with psutil.

Figures:

- ``first``: VLLMModel POST -> cache PVC and cache Job created and the first status written (what the
  operator does before the cluster has anything to report);
- ``ready``: VLLMModel POST -> Deployment and Service created and ``status.phase: Ready`` written; this
  includes ~0.15 s of emulated cluster work (cache pod 0.1 s, rollout 0.05 s) and two more reconciles.
- latency: models created one after another (each waits for the previous one to be Ready);
- burst: N models POSTed at once (50 requests in flight), wall time until the last is Ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import kmock  # noqa: E402
from kube_emulator import DEPLOYMENTS, JOBS, PVCS, SERVICES, VLLMMODELS, KubeEmulator  # noqa: E402

LABEL_MODEL = "vllm-operator.io/model"
NAMESPACE = "bench"
CHILD_KINDS = {PVCS: "pvc", JOBS: "job", DEPLOYMENTS: "deployment", SERVICES: "service"}
SIZES = {"tiny": {"latency_models": 5, "burst_models": 20}, "full": {"latency_models": 200, "burst_models": 1000}}


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b,c=d``, ``a!=b``, ``a``): what the operator sends."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value.lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class TimedEmulator(KubeEmulator):
    """The project's emulator, plus write time-stamps per model and the look-ups a real API server indexes.

    kmock is built for tests, not load: it matches each request against its whole request history
    (quadratic in requests) and scans every object on every GET, LIST, create and update. Here the
    history keeps only requests not yet matched to a reaction, a GET/create/update finds its object by
    key, and a LIST by model label reads an index; the answers are the same, so the operator sees the
    same API, only faster.
    """

    marks: dict[str, dict[str, float]] = attrs.field(factory=dict)
    waiters: dict[str, tuple[str, asyncio.Future[float]]] = attrs.field(factory=dict)
    _in_flight: dict[int, Any] = attrs.field(factory=dict, init=False)
    _by_model: dict[tuple[Any, Any, str], list[Any]] = attrs.field(factory=dict, init=False)
    _indexed: int = attrs.field(default=0, init=False)

    def _store(self) -> dict[Any, Any]:
        return self.objects._objects  # type: ignore[no-any-return]

    def _index(self) -> None:
        store = self._store()
        for key, obj in itertools.islice(store.items(), self._indexed, None):
            labels = ((obj.last.raw if obj.deleted else obj.raw).get("metadata") or {}).get("labels") or {}
            if LABEL_MODEL in labels:
                self._by_model.setdefault((key[0], key[1], labels[LABEL_MODEL]), []).append(key)
        self._indexed = len(store)

    def _dispatched(self, request: kmock.Request) -> None:
        """kmock matched the request to a reaction: it no longer needs to be in the history."""
        self._in_flight.pop(id(request), None)

    async def _serve_create(self, request: kmock.Request) -> Any:
        self._dispatched(request)
        meta = (request.data or {}).get("metadata") or {}
        obj = self._store().get((request.resource, request.namespace or meta.get("namespace"), meta.get("name")))
        return obj.raw if obj is not None and not obj.deleted else await super()._serve_create(request)

    async def _serve_update(self, request: kmock.Request) -> Any:
        self._dispatched(request)
        obj = self._store().get((request.resource, request.namespace, request.name))
        return obj.last.raw if obj is not None else await super()._serve_update(request)

    async def _serve_watch(self, request: kmock.Request) -> Any:
        self._dispatched(request)
        async for item in super()._serve_watch(request):
            yield item

    async def _serve_list(self, request: kmock.Request) -> Any:
        self._dispatched(request)
        selector = request.params.get("labelSelector") or ""
        model = next((t.split("=", 1)[1] for t in selector.split(",") if t.startswith(LABEL_MODEL + "=")), None)
        if model is None or request.namespace is None:
            payload = await super()._serve_list(request)
            if selector and isinstance(payload, dict):
                payload["items"] = [
                    obj for obj in payload["items"]
                    if _selector_matches(selector, (obj.get("metadata") or {}).get("labels") or {})
                ]  # fmt: skip
            return payload
        async with self._lock:
            self._index()
            store = self._store()
            objs = [store[k] for k in self._by_model.get((request.resource, request.namespace, model), [])]
            items = [o.raw for o in objs if not o.deleted]
        items = [o for o in items if _selector_matches(selector, (o.get("metadata") or {}).get("labels") or {})]
        return {"metadata": {"resourceVersion": "..."}, "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        self._dispatched(request)
        if request.name is None:
            return await super()._serve_fetch(request)
        obj = self._store().get((request.resource, request.namespace, request.name))
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _handle(self, request: kmock.Request) -> Any:
        self._in_flight[id(request)] = request
        if len(self._requests) > len(self._in_flight):  # keep only requests still being answered (watches included)
            self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        try:
            response = await super()._handle(request)
        finally:
            self._in_flight.pop(id(request), None)
        if request.resource is not None and getattr(response, "status", 500) < 400:
            self._stamp(request)
        return response

    def _stamp(self, request: kmock.Request) -> None:
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
            return
        data = request.data if isinstance(request.data, dict) else {}
        now = time.perf_counter()
        model = None
        if request.resource in CHILD_KINDS:
            model = ((data.get("metadata") or {}).get("labels") or {}).get(LABEL_MODEL)
            if model:
                self.marks.setdefault(model, {}).setdefault(CHILD_KINDS[request.resource], now)
        elif request.resource == VLLMMODELS and request.subresource == "status" and request.name:
            marks = self.marks.setdefault(request.name, {})
            marks.setdefault("status", now)
            phase = (data.get("status") or {}).get("phase")
            if phase:
                marks.setdefault(f"phase:{phase}", now)
        else:
            return
        name = request.name if request.resource == VLLMMODELS else model
        waiter = self.waiters.get(name or "")
        if waiter is not None and not waiter[1].done() and reached(self.marks.get(name or "", {}), waiter[0]):
            waiter[1].set_result(now)


STAGES = {
    "first": ("pvc", "job", "status"),
    "ready": ("pvc", "job", "deployment", "service", "phase:Ready"),
}


def reached(marks: dict[str, float], stage: str) -> bool:
    return all(key in marks for key in STAGES[stage])


def stage_time(marks: dict[str, float], stage: str) -> float:
    return max(marks[key] for key in STAGES[stage])


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"model": "bench-org/tiny-llama", "revision": "main", "replicas": 1},
    }


class OperatorProcess:
    """The operator in a child process; its RSS and CPU time from outside."""

    def __init__(self, server_url: str, log_path: Path, tracemalloc: Path | None = None,
                 reconcile_interval: float | None = None) -> None:  # fmt: skip
        self.log = log_path.open("w")
        self.tracemalloc = tracemalloc
        extra = ["--tracemalloc", str(tracemalloc)] if tracemalloc else []
        self.metrics_port = free_port()
        if reconcile_interval is not None:
            extra += ["--reconcile-interval", str(reconcile_interval)]
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            [sys.executable, str(REPO / "bench" / "operator_child.py"), "--server", server_url,
             "--metrics-port", str(self.metrics_port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def peak_rss(self) -> int:
        """VmHWM: the highest resident set size so far (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return self.rss()

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def _create(session: aiohttp.ClientSession, base: str, name: str) -> float:
    t0 = time.perf_counter()
    url = f"{base}/apis/vllm-operator.io/v1alpha1/namespaces/{NAMESPACE}/vllmmodels"
    async with session.post(url, json=model_body(name)) as resp:
        if resp.status >= 400:
            raise RuntimeError(f"creating {name}: HTTP {resp.status}: {(await resp.text())[:300]}")
    return t0


async def _wait_operator_ready(session: aiohttp.ClientSession, base: str, emu: TimedEmulator,
                               op: OperatorProcess, timeout: float = 60.0) -> None:  # fmt: skip
    """Create a warm-up model and wait for it: kopf is then watching and the first imports are done."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[float] = loop.create_future()
    emu.waiters["warmup"] = ("ready", fut)
    await _create(session, base, "warmup")
    deadline = time.monotonic() + timeout
    while not fut.done():
        if op.proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {op.proc.returncode}; see {op.log.name}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the operator did not reconcile a first model in {timeout:.0f} s; see {op.log.name}")
        await asyncio.sleep(0.05)


async def _latency(session: aiohttp.ClientSession, base: str, emu: TimedEmulator, count: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    first, ready = [], []
    for i in range(count):
        name = f"lat-{i:04d}"
        fut: asyncio.Future[float] = loop.create_future()
        emu.waiters[name] = ("ready", fut)
        t0 = await _create(session, base, name)
        await asyncio.wait_for(fut, timeout=60)
        marks = emu.marks[name]
        first.append(stage_time(marks, "first") - t0)
        ready.append(stage_time(marks, "ready") - t0)
    return {
        "models": count,
        "first_p50_ms": 1000 * percentile(first, 50),
        "first_p99_ms": 1000 * percentile(first, 99),
        "ready_p50_ms": 1000 * percentile(ready, 50),
        "ready_p99_ms": 1000 * percentile(ready, 99),
        "ready_mean_ms": 1000 * statistics.fmean(ready),
    }


async def _burst(session: aiohttp.ClientSession, base: str, emu: TimedEmulator, count: int,
                 timeout: float) -> dict[str, Any]:  # fmt: skip
    loop = asyncio.get_running_loop()
    names = [f"burst-{i:04d}" for i in range(count)]
    futures = {}
    for name in names:
        futures[name] = loop.create_future()
        emu.waiters[name] = ("ready", futures[name])
    gate = asyncio.Semaphore(50)

    async def create(name: str) -> float:
        async with gate:
            return await _create(session, base, name)

    started = time.perf_counter()
    created = await asyncio.gather(*(create(n) for n in names))
    posted = time.perf_counter() - started
    done, pending = await asyncio.wait(list(futures.values()), timeout=timeout)
    wall = max((f.result() for f in done), default=time.perf_counter()) - started
    first = [stage_time(emu.marks[n], "first") - t0 for n, t0 in zip(names, created, strict=True)
             if reached(emu.marks.get(n, {}), "first")]  # fmt: skip
    return {
        "models": count,
        "reconciled": len(done),
        "wall_s": wall,
        "post_s": posted,
        "first_p50_ms": 1000 * percentile(first, 50),
        "first_p99_ms": 1000 * percentile(first, 99),
        "timed_out": bool(pending),
    }


async def _reconcile_count(session: aiohttp.ClientSession, port: int) -> float:
    """vllm_operator_reconcile_total summed over results, from the operator's own /metrics."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm_operator_reconcile_total{"))  # fmt: skip


async def run_async(size: str, workdir: Path, tracemalloc: Path | None = None,
                    reconcile_interval: float | None = None) -> dict[str, Any]:  # fmt: skip
    sizes = SIZES[size]
    log_path = workdir / "operator.log"
    async with TimedEmulator() as emu, kmock.Server(emu) as server:
        base = str(server.url).rstrip("/")
        parent = psutil.Process()
        op = OperatorProcess(base, log_path, tracemalloc, reconcile_interval)
        try:
            async with aiohttp.ClientSession() as session:
                await _wait_operator_ready(session, base, emu, op)
                await emu.settle()
                await asyncio.sleep(1.0)
                rss_idle = op.rss()
                cpu0, emu_cpu0 = op.cpu_seconds(), sum(parent.cpu_times()[:2])
                latency = await _latency(session, base, emu, sizes["latency_models"])
                cpu1, emu_cpu1 = op.cpu_seconds(), sum(parent.cpu_times()[:2])
                burst = await _burst(session, base, emu, sizes["burst_models"], timeout=300.0)
                cpu2, emu_cpu2 = op.cpu_seconds(), sum(parent.cpu_times()[:2])
                await asyncio.sleep(2.0)  # let the last events drain before reading memory
                total_models = 1 + sizes["latency_models"] + sizes["burst_models"]
                rss_loaded, rss_peak = op.rss(), op.peak_rss()
                reconciles = await _reconcile_count(session, op.metrics_port)
                if tracemalloc:
                    op.proc.send_signal(signal.SIGUSR1)
                    await asyncio.sleep(5.0)
        finally:
            op.stop()
    return {
        "size": size,
        "setup": "operator in a child process (kopf, project handlers, INFO log to a file); kmock emulator "
                 "in the parent process; both on this machine's cores; loopback HTTP",  # fmt: skip
        "latency": latency,
        "burst": burst,
        "memory": {
            "models": total_models,
            "rss_idle_mb": rss_idle / 2**20,
            "rss_loaded_mb": rss_loaded / 2**20,
            "rss_peak_mb": rss_peak / 2**20,
            "per_model_kb": (rss_loaded - rss_idle) / max(1, total_models) / 1024,
        },
        "reconciles": {
            "total": reconciles,
            "per_model": reconciles / max(1, total_models),
        },
        "cpu": {
            "operator_ms_per_model_latency": 1000 * (cpu1 - cpu0) / max(1, sizes["latency_models"]),
            "emulator_ms_per_model_latency": 1000 * (emu_cpu1 - emu_cpu0) / max(1, sizes["latency_models"]),
            "operator_ms_per_model_burst": 1000 * (cpu2 - cpu1) / max(1, sizes["burst_models"]),
            "emulator_ms_per_model_burst": 1000 * (emu_cpu2 - emu_cpu1) / max(1, sizes["burst_models"]),
        },
        "log": str(log_path),
    }


def run(size: str = "tiny", workdir: Path | None = None, tracemalloc: Path | None = None,
        reconcile_interval: float | None = None) -> dict[str, Any]:  # fmt: skip
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-operator-")))
        return asyncio.run(run_async(size, workdir, tracemalloc, reconcile_interval))


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="the operator benchmark alone (bench/run.py runs it too)")
    parser.add_argument("size", nargs="?", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--tracemalloc", type=Path, help="diagnostics: the operator's top allocations go here")
    parser.add_argument("--reconcile-interval", type=float, help="override the operator's periodic resync (s)")
    args = parser.parse_args()
    print(json.dumps(run(args.size, Path(tempfile.mkdtemp()), args.tracemalloc, args.reconcile_interval), indent=1))
    os._exit(0)
