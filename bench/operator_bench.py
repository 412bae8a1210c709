"""The operator against an emulated API server: latency, a burst, memory, API load, and create/delete cycles.

    .venv/bin/python bench/operator_bench.py [tiny|full] [--baseline REF] [--scenarios load,cycles]
        [--cycles N] [--cycle-batch N] [--resync-interval S] [--idle-window S] [--env VLLM_OPERATOR_X=V]
        [--json bench/operator_results.json] [--markdown FILE]

Set-up (two processes on the same machine, sharing its cores):

- this process: the project's kmock API emulator (``tests/kube_emulator.py``: apply, status subresource,
  owner GC, a Job controller whose pod finishes ~0.1 s after the Job is created with a cache summary, a
  Deployment controller that reports all replicas ready ~0.05 s after a spec change, a PVC binder), served
  over loopback HTTP. Lists honour ``labelSelector`` here, as a real API server does (kmock ignores it,
  which would make every reconcile list every model's Jobs and Pods: an emulator artefact, not the
  operator's cost). Each write is time-stamped as the emulator answers it, and every request the
  operator makes is counted by verb and resource (``bench/operator_report.py`` says how).
- a child process (``bench/operator_child.py``): the real operator (``runner.operator_task``, kopf with the
  project's handlers and settings, unchanged), logged at INFO to a file, its knobs from ``VLLM_OPERATOR_*``
  variables. Its resident memory and CPU time are read from outside with psutil.

Scenarios, each on a fresh emulator and a fresh operator process:

- ``load``: a warm-up model; then ``latency``: models created one after another (each waits for the
  previous one to be Ready): ``first`` = VLLMModel POST -> cache PVC, cache Job and first status written,
  ``ready`` = POST -> Deployment, Service and ``status.phase: Ready`` written (includes ~0.15 s of emulated
  cluster work); then ``burst``: N models POSTed at once (50 requests in flight), wall time until the last
  is Ready; then an ``idle`` window as long as one resync interval plus 5 s, in which only the periodic
  resync runs; RSS is read after it, with every model still there. API requests are reported per phase.
- ``cycles``: models created ``--cycle-batch`` at a time, each batch waited for until Ready (``--cycle-until
  first``: until PVC, Job and first status), then deleted;
  RSS sampled every tenth of the run (at batch boundaries); first, last and max sample and the least-squares slope over the
  samples after the first tenth (MB per 1,000 cycles). Deleted objects are purged from the emulator
  between batches (``TimedEmulator.purge``) so the emulator's cost does not grow with the cycle count.

``--baseline REF`` runs the same scenarios on the code at REF (a ``git worktree`` in a temporary folder,
its ``operator/`` and ``runtime/`` first on the child's ``PYTHONPATH``) in the same invocation, alternating
the order per scenario (load: baseline first; cycles: current first), and prints the two side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import kmock  # noqa: E402
from kube_emulator import DEPLOYMENTS, JOBS, PVCS, SERVICES, VLLMMODELS, KubeEmulator  # noqa: E402

from bench import machine, operator_report  # noqa: E402

LABEL_MODEL = operator_report.LABEL_MODEL
NAMESPACE = "bench"
CHILD_KINDS = {PVCS: "pvc", JOBS: "job", DEPLOYMENTS: "deployment", SERVICES: "service"}
DRIVER_HEADER = "X-Bench-Driver"  # the bench's own requests: not counted as the operator's
RESULTS_JSON = REPO / "bench" / "operator_results.json"
SCENARIOS = ("load", "cycles")
# resync_interval: VLLM_OPERATOR_RECONCILE_INTERVAL_SECONDS for both sides (30 s is the value shipped at
# 992f9f6; set explicitly so the idle window holds one resync whatever a version's default is).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"latency_models": 5, "burst_models": 20, "cycles": 50, "cycle_batch": 10, "resync_interval": 2.0},
    "full": {"latency_models": 200, "burst_models": 1000, "cycles": 10_000, "cycle_batch": 100,
             "resync_interval": 30.0},
}  # fmt: skip


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
    """The project's emulator, plus write time-stamps per model, request counts and indexed look-ups.

    Every request is counted under a verb and resource (``operator_report.classify``) unless it carries
    ``DRIVER_HEADER`` (the bench's own creates and deletes).

    kmock is built for tests, not load: it matches each request against its whole request history
    (quadratic in requests) and scans every object on every GET, LIST, create and update. Here the
    history keeps only requests not yet matched to a reaction, a GET/create/update finds its object by
    key, and a LIST by model label reads an index; the answers are the same, so the operator sees the
    same API, only faster.
    """

    marks: dict[str, dict[str, float]] = attrs.field(factory=dict)
    requests: Counter[str] = attrs.field(factory=Counter)  # "VERB resource" -> count, the operator's only
    errors: Counter[str] = attrs.field(factory=Counter)  # of those, answered >= 400 (or failed)
    per_model_lists: int = 0
    waiters: dict[str, tuple[str, asyncio.Future[float]]] = attrs.field(factory=dict)
    _in_flight: dict[int, Any] = attrs.field(factory=dict, init=False)
    _by_model: dict[tuple[Any, Any, str], list[Any]] = attrs.field(factory=dict, init=False)
    _indexed: int = attrs.field(default=0, init=False)
    # uid -> key and owner uid -> keys, as last written; checked against the store on every read
    _key_of_uid: dict[str, Any] = attrs.field(factory=dict, init=False)
    _owned_by: dict[str, set[Any]] = attrs.field(factory=dict, init=False)

    def _store(self) -> dict[Any, Any]:
        return self.objects._objects  # type: ignore[no-any-return]

    def _index(self) -> None:
        store = self._store()
        for key, obj in itertools.islice(store.items(), self._indexed, None):
            raw = obj.last.raw if obj.deleted else obj.raw
            labels = (raw.get("metadata") or {}).get("labels") or {}
            if LABEL_MODEL in labels:
                self._by_model.setdefault((key[0], key[1], labels[LABEL_MODEL]), []).append(key)
            self._index_owners(key, raw)
        self._indexed = len(store)

    def _index_owners(self, key: Any, raw: dict[str, Any]) -> None:
        meta = raw.get("metadata") or {}
        if meta.get("uid"):
            self._key_of_uid[meta["uid"]] = key
        for ref in meta.get("ownerReferences") or []:
            self._owned_by.setdefault(ref.get("uid"), set()).add(key)

    # The base emulator scans every stored object for each owned create and each delete; over thousands
    # of create/delete cycles that scan, not the operator, would set the pace. Same answers, from the index.
    def _react(self, resource: kmock.resource, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        self._index()
        self._index_owners((resource, obj["metadata"]["namespace"], obj["metadata"]["name"]), obj)
        super()._react(resource, obj, before)

    async def put(self, resource: kmock.resource, namespace: str, name: str, patch: dict[str, Any],
                  *, create: bool = True) -> None:  # fmt: skip
        await super().put(resource, namespace, name, patch, create=create)
        obj = self._store().get((resource, namespace, name))
        if obj is not None and not obj.deleted:
            self._index_owners((resource, namespace, name), obj.raw)

    def _live(self, key: Any) -> dict[str, Any] | None:
        obj = self._store().get(key)
        return None if obj is None or obj.deleted else obj.raw

    def _any_alive(self, uids: set[Any]) -> bool:
        self._index()
        for uid in uids:
            raw = self._live(self._key_of_uid.get(uid))
            if raw is not None and raw["metadata"].get("uid") == uid:
                return True
        return super()._any_alive(uids)  # not indexed (an owner that is gone): the exact answer

    def _dependents_of(self, uids: set[Any]) -> list[tuple[Any, Any, Any]]:
        self._index()
        found = []
        for key in {key for uid in uids for key in self._owned_by.get(uid, ())}:
            raw = self._live(key)
            if raw is not None and any(ref.get("uid") in uids for ref in raw["metadata"].get("ownerReferences") or []):
                found.append(key)
        return found

    def store_stats(self) -> dict[str, int]:
        """What the emulator holds: live and deleted objects, their stored versions, unread watch events."""
        store = self._store()
        live_by_kind = Counter(getattr(key[0], "plural", "?") for key, obj in store.items() if not obj.deleted)
        live = sum(live_by_kind.values())
        return {
            **{f"live {kind}": n for kind, n in sorted(live_by_kind.items())},
            "live": live,
            "deleted": len(store) - live,
            "versions": sum(len(obj.history) for obj in store.values()),
            "live_events": sum(1 for key, obj in store.items()
                               if not obj.deleted and getattr(key[0], "plural", None) == "events"),  # fmt: skip
            "watch_buffer": sum(bus.buffer_size for bus in self._buses.values()),
            "tasks": len(self._tasks),
            "requests_kept": len(self._requests),
        }

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
        counted = self._count(request)
        self._in_flight[id(request)] = request
        if len(self._requests) > len(self._in_flight):  # keep only requests still being answered (watches included)
            self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        try:
            response = await super()._handle(request)
        except Exception:
            if counted:
                self.errors[counted] += 1
            raise
        finally:
            self._in_flight.pop(id(request), None)
        if counted and getattr(response, "status", 500) >= 400:
            self.errors[counted] += 1
        if request.resource is not None and getattr(response, "status", 500) < 400:
            self._stamp(request)
        return response

    def _count(self, request: kmock.Request) -> str | None:
        """Count one request of the operator (not the bench's own, which carry DRIVER_HEADER)."""
        if any(key.lower() == DRIVER_HEADER.lower() for key in request.headers):
            return None
        resource = request.resource
        verb, name = operator_report.classify(
            str(getattr(request.method, "value", request.method) or ""),
            getattr(request.action, "value", None),
            getattr(resource, "plural", None), getattr(resource, "group", None), request.subresource,
            request.headers.get("Content-Type", "") or request.headers.get("content-type", ""),
            str(request.params.get("watch", "")).lower() in ("true", "1"),
        )  # fmt: skip
        key = f"{verb} {name}"
        self.requests[key] += 1
        if operator_report.is_per_model_list(verb, request.params.get("labelSelector") or ""):
            self.per_model_lists += 1
        return key

    def api_snapshot(self) -> tuple[dict[str, int], dict[str, int], int]:
        return dict(self.requests), dict(self.errors), self.per_model_lists

    def api_since(self, before: tuple[dict[str, int], dict[str, int], int], models: int) -> dict[str, Any]:
        counts, errors, per_model_lists = self.api_snapshot()
        return operator_report.load_summary(operator_report.diff(counts, before[0]),
                                            operator_report.diff(errors, before[1]),
                                            per_model_lists - before[2], models)  # fmt: skip

    def purge(self, models: set[str]) -> int:
        """Hard-delete soft-deleted objects and the Events of ``models`` or of objects that are gone.

        A long create/delete run would otherwise keep every deleted object (kmock keeps their history)
        and every Event (a real API server expires them after an hour; the operator does not watch them).
        """
        store = self._store()
        live = {(getattr(key[0], "plural", None), key[1], key[2]) for key, obj in store.items() if not obj.deleted}

        def stale_event(key: Any, obj: Any) -> bool:
            if getattr(key[0], "plural", None) != "events":
                return False
            about = obj.raw.get("involvedObject") or obj.raw.get("regarding") or {}
            plural = VLLMMODELS.plural if about.get("kind") == "VLLMModel" else None
            return about.get("name") in models or (
                plural is not None and (plural, about.get("namespace"), about.get("name")) not in live)

        gone = [key for key, obj in store.items() if obj.deleted or stale_event(key, obj)]
        for key in gone:
            del store[key]
        self._by_model.clear()
        self._key_of_uid.clear()
        self._owned_by.clear()
        self._indexed = 0
        return len(gone)

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


def model_body(name: str, cache_delete_policy: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "bench-org/tiny-llama", "revision": "main", "replicas": 1}
    if cache_delete_policy:
        spec["cache"] = {"deletePolicy": cache_delete_policy}
    return {
        "apiVersion": "vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def cycle_model_body(name: str) -> dict[str, Any]:
    """A model whose cache goes with it: the default ``Retain`` keeps every cycle's PVC in the cluster, and
    the operator rightly keeps watching (and indexing) PVCs that exist, so memory would grow by design."""
    return model_body(name, cache_delete_policy="Delete")


# --- the code under test: the current checkout or a worktree of another commit ---------------------------


def _git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=120)  # noqa: S603,S607
    return done.stdout.strip()


@dataclass(frozen=True)
class Side:
    """One version of the operator: a label, the commit, and the source root its child imports from."""

    label: str
    ref: str
    commit: str
    root: Path
    dirty: bool = False  # the checkout's operator/ or runtime/ has uncommitted changes

    @property
    def pythonpath(self) -> str:
        return os.pathsep.join(str(self.root / part) for part in ("operator", "runtime"))

    def describe(self) -> str:
        return f"{self.label} ({self.commit[:8]}{' + uncommitted changes' if self.dirty else ''})"


def current_side() -> Side:
    dirty = bool(_git("status", "--porcelain", "--", "operator", "runtime"))
    return Side("current", "HEAD", _git("rev-parse", "HEAD"), REPO, dirty)


@contextlib.contextmanager
def baseline_side(ref: str, parent: Path) -> Iterator[Side]:
    """A detached ``git worktree`` of ``ref`` under ``parent``, removed afterwards."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = parent / f"baseline-{commit[:12]}"
    _git("worktree", "add", "--detach", str(path), commit)
    try:
        yield Side("baseline", ref, commit, path)
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path, ignore_errors=True)


class OperatorProcess:
    """The operator in a child process, with ``side``'s code first on its path; its RSS and CPU from outside."""

    def __init__(self, server_url: str, log_path: Path, side: Side, env: dict[str, str],
                 tracemalloc: Path | None = None) -> None:  # fmt: skip
        self.log = log_path.open("w")
        self.log_path = log_path
        self.tracemalloc = tracemalloc
        extra = ["--tracemalloc", str(tracemalloc)] if tracemalloc else []
        self.metrics_port = free_port()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_OPERATOR_")}
        child_env.update(env)
        child_env["VLLM_OPERATOR_METRICS_PORT"] = str(self.metrics_port)
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, (side.pythonpath, os.environ.get("PYTHONPATH"))))
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            [sys.executable, str(REPO / "bench" / "operator_child.py"), "--server", server_url, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=side.root, env=child_env,
        )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)

    def imported_from(self) -> str | None:
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines()[:50]:
                if operator_report.IMPORTED_FROM in line:
                    return line.split(operator_report.IMPORTED_FROM, 1)[1].strip()
        return None

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


# --- driving the emulated cluster ----------------------------------------------------------------------


MODELS_URL = f"/apis/vllm-operator.io/v1alpha1/namespaces/{NAMESPACE}/vllmmodels"
DRIVER = {DRIVER_HEADER: "1"}


async def _create(session: aiohttp.ClientSession, base: str, name: str,
                  body: Callable[[str], dict[str, Any]] = model_body) -> float:  # fmt: skip
    t0 = time.perf_counter()
    async with session.post(base + MODELS_URL, json=body(name), headers=DRIVER) as resp:
        if resp.status >= 400:
            raise RuntimeError(f"creating {name}: HTTP {resp.status}: {(await resp.text())[:300]}")
    return t0


async def _delete(session: aiohttp.ClientSession, base: str, name: str) -> None:
    async with session.delete(f"{base}{MODELS_URL}/{name}", headers=DRIVER) as resp:
        if resp.status >= 400 and resp.status != 404:
            raise RuntimeError(f"deleting {name}: HTTP {resp.status}: {(await resp.text())[:300]}")


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
            raise RuntimeError(f"the operator exited with {op.proc.returncode}; see {op.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the operator did not reconcile a first model in {timeout:.0f} s; see {op.log_path}")
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


async def _create_all(session: aiohttp.ClientSession, base: str, emu: TimedEmulator, names: list[str],
                      stage: str = "ready", body: Callable[[str], dict[str, Any]] = model_body,
                      ) -> tuple[list[float], dict[str, asyncio.Future[float]]]:  # fmt: skip
    """POST ``names`` with 50 in flight; the POST times and a future per model that resolves at ``stage``."""
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[float]] = {}
    for name in names:
        futures[name] = loop.create_future()
        emu.waiters[name] = (stage, futures[name])
    gate = asyncio.Semaphore(50)

    async def create(name: str) -> float:
        async with gate:
            return await _create(session, base, name, body)

    return list(await asyncio.gather(*(create(n) for n in names))), futures


async def _burst(session: aiohttp.ClientSession, base: str, emu: TimedEmulator, count: int,
                 timeout: float) -> dict[str, Any]:  # fmt: skip
    names = [f"burst-{i:04d}" for i in range(count)]
    started = time.perf_counter()
    created, futures = await _create_all(session, base, emu, names)
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
    """vllm_operator_reconcile_total summed over results, from the operator's own /metrics (nan if absent)."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return float("nan")
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("vllm_operator_reconcile_total{")]  # fmt: skip
    return sum(found) if found else float("nan")


@dataclass
class Options:
    """What to run, at which size; ``env`` goes to the operator child of both sides."""

    size: str = "tiny"
    latency_models: int = 5
    burst_models: int = 20
    cycles: int = 50
    cycle_batch: int = 10
    cycle_until: str = "ready"  # or "first": delete once PVC, Job and first status are written (faster)
    resync_interval: float | None = 2.0
    idle_window: float | None = None  # None: resync_interval + 5 s
    burst_timeout: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    tracemalloc: Path | None = None

    @classmethod
    def for_size(cls, size: str, **overrides: Any) -> Options:
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(size=size, **{**SIZES[size], **given})

    def child_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.resync_interval is not None:
            env.setdefault("VLLM_OPERATOR_RECONCILE_INTERVAL_SECONDS", f"{self.resync_interval:g}")
        return env

    def idle_seconds(self) -> float:
        if self.idle_window is not None:
            return self.idle_window
        return (self.resync_interval if self.resync_interval is not None else 30.0) + 5.0


@contextlib.asynccontextmanager
async def _cluster_and_operator(side: Side, opts: Options, log_path: Path,
                                tracemalloc: Path | None = None) -> Any:  # fmt: skip
    async with TimedEmulator() as emu, kmock.Server(emu) as server:
        base = str(server.url).rstrip("/")
        op = OperatorProcess(base, log_path, side, opts.child_env(), tracemalloc)
        try:
            async with aiohttp.ClientSession() as session:
                await _wait_operator_ready(session, base, emu, op)
                await emu.settle()
                yield emu, op, session, base
        finally:
            op.stop()


async def scenario_load(side: Side, opts: Options, workdir: Path) -> dict[str, Any]:
    log_path = workdir / f"operator-{side.label}-load.log"
    parent = psutil.Process()
    async with _cluster_and_operator(side, opts, log_path, opts.tracemalloc) as (emu, op, session, base):
        startup_api = emu.api_since(({}, {}, 0), 1)
        await asyncio.sleep(1.0)
        rss_idle = op.rss()
        snap0, cpu0, emu_cpu0 = emu.api_snapshot(), op.cpu_seconds(), sum(parent.cpu_times()[:2])
        latency = await _latency(session, base, emu, opts.latency_models)
        snap1, cpu1, emu_cpu1 = emu.api_snapshot(), op.cpu_seconds(), sum(parent.cpu_times()[:2])
        burst = await _burst(session, base, emu, opts.burst_models, timeout=opts.burst_timeout)
        await asyncio.sleep(2.0)  # let the last events drain
        snap2, cpu2, emu_cpu2 = emu.api_snapshot(), op.cpu_seconds(), sum(parent.cpu_times()[:2])
        total_models = 1 + opts.latency_models + opts.burst_models
        await asyncio.sleep(opts.idle_seconds())
        idle_api = emu.api_since(snap2, total_models)
        cpu3 = op.cpu_seconds()
        rss_loaded, rss_peak = op.rss(), op.peak_rss()
        reconciles = await _reconcile_count(session, op.metrics_port)
        imported = op.imported_from()
        if opts.tracemalloc:
            op.proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(5.0)
    return {
        "latency": latency,
        "burst": burst,
        "memory": {
            "models": total_models,
            "rss_idle_mb": rss_idle / 2**20,
            "rss_loaded_mb": rss_loaded / 2**20,
            "rss_peak_mb": rss_peak / 2**20,
            "per_model_kb": (rss_loaded - rss_idle) / max(1, total_models) / 1024,
        },
        "reconciles": {"total": reconciles, "per_model": reconciles / max(1, total_models)},
        "cpu": {
            "operator_ms_per_model_latency": 1000 * (cpu1 - cpu0) / max(1, opts.latency_models),
            "emulator_ms_per_model_latency": 1000 * (emu_cpu1 - emu_cpu0) / max(1, opts.latency_models),
            "operator_ms_per_model_burst": 1000 * (cpu2 - cpu1) / max(1, opts.burst_models),
            "emulator_ms_per_model_burst": 1000 * (emu_cpu2 - emu_cpu1) / max(1, opts.burst_models),
            "operator_ms_idle_window": 1000 * (cpu3 - cpu2),
        },
        "api": {
            "startup": startup_api,
            "latency": _api_between(snap0, snap1, opts.latency_models),
            "burst": _api_between(snap1, snap2, opts.burst_models),
            "idle": idle_api,
            "idle_window_s": opts.idle_seconds(),
            "resync_interval_s": opts.resync_interval,
        },
        "imported_from": imported,
        "log": str(log_path),
    }


def _api_between(a: tuple[dict[str, int], dict[str, int], int],
                 b: tuple[dict[str, int], dict[str, int], int], models: int) -> dict[str, Any]:  # fmt: skip
    return operator_report.load_summary(operator_report.diff(b[0], a[0]), operator_report.diff(b[1], a[1]),
                                        b[2] - a[2], models)  # fmt: skip


async def scenario_cycles(side: Side, opts: Options, workdir: Path) -> dict[str, Any]:
    log_path = workdir / f"operator-{side.label}-cycles.log"
    sample_every = max(opts.cycle_batch, opts.cycles // 10)  # samples fall on batch boundaries
    async with _cluster_and_operator(side, opts, log_path, opts.tracemalloc) as (emu, op, session, base):
        await asyncio.sleep(1.0)
        samples: list[tuple[int, float]] = [(0, op.rss() / 2**20)]
        store_samples: list[tuple[int, dict[str, int]]] = []
        snap0, cpu0, started = emu.api_snapshot(), op.cpu_seconds(), time.perf_counter()
        done = not_ready = purged = 0
        next_sample = sample_every
        while done < opts.cycles:
            names = [f"cyc-{done + i:05d}" for i in range(min(opts.cycle_batch, opts.cycles - done))]
            _, futures = await _create_all(session, base, emu, names, opts.cycle_until, cycle_model_body)
            _, pending = await asyncio.wait(list(futures.values()), timeout=120.0)
            not_ready += len(pending)
            gate = asyncio.Semaphore(50)

            async def delete(name: str) -> None:
                async with gate:
                    await _delete(session, base, name)

            await asyncio.gather(*(delete(n) for n in names))
            await emu.settle()
            for name in names:
                emu.marks.pop(name, None)
                emu.waiters.pop(name, None)
            purged += emu.purge(set(names))
            done += len(names)
            if done >= next_sample or done == opts.cycles:
                samples.append((done, op.rss() / 2**20))
                stats = emu.store_stats()
                store_samples.append((done, stats))
                if opts.tracemalloc:  # a snapshot at every sample (operator_child.py)
                    op.proc.send_signal(signal.SIGUSR1)
                print(f"cycles {done}: {done / (time.perf_counter() - started):.1f}/s so far, operator RSS "
                      f"{samples[-1][1]:.1f} MB, emulator {stats}", file=sys.stderr, flush=True)  # fmt: skip
                while next_sample <= done:
                    next_sample += sample_every
            if op.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {op.proc.returncode}; see {log_path}")
        seconds = time.perf_counter() - started
        cpu = op.cpu_seconds() - cpu0
        api = emu.api_since(snap0, opts.cycles)
        peak = op.peak_rss() / 2**20
    fitted = [s for s in samples if s[0] >= sample_every] or samples
    rss = [y for _, y in samples]
    return {
        "cycles": opts.cycles,
        "batch": opts.cycle_batch,
        "until": opts.cycle_until,
        "cache_delete_policy": cycle_model_body("-")["spec"]["cache"]["deletePolicy"],
        "seconds": seconds,
        "cycles_per_s": opts.cycles / seconds if seconds else float("nan"),
        "not_ready": not_ready,
        "rss_samples_mb": operator_report.compact(samples),
        "rss_first_mb": rss[0],
        "rss_last_mb": rss[-1],
        "rss_max_mb": max(rss),
        "rss_peak_mb": peak,
        "slope_mb_per_1000": operator_report.slope_per(fitted, 1000),
        "slope_fitted_from_cycle": fitted[0][0],
        "operator_cpu_ms_per_cycle": 1000 * cpu / max(1, opts.cycles),
        "emulator_objects_purged": purged,
        "emulator_store_samples": store_samples,
        "api": api,
        "log": str(log_path),
    }


RUNNERS = {"load": scenario_load, "cycles": scenario_cycles}


async def run_sides(sides: list[Side], opts: Options, scenarios: list[str], workdir: Path,
                    baseline_scenarios: Iterable[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Each scenario for every side (the baseline only runs ``baseline_scenarios``, all when None), the
    order alternating per scenario; results by side label."""
    results: dict[str, dict[str, Any]] = {side.label: {} for side in sides}
    order: list[str] = []
    timings: dict[str, float] = {}
    for i, name in enumerate(scenarios):
        for side in sides if i % 2 == 0 else list(reversed(sides)):
            if side.label == "baseline" and baseline_scenarios is not None and name not in baseline_scenarios:
                continue
            order.append(f"{name}:{side.label}")
            print(f"   operator bench: {name} on {side.describe()} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            results[side.label][name] = await RUNNERS[name](side, opts, workdir)
            timings[f"{name}:{side.label}"] = time.monotonic() - t0
            print(f"   operator bench: {name} on {side.label}: {timings[f'{name}:{side.label}']:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {"results": results, "order": order, "seconds": timings}


def run(size: str = "tiny", workdir: Path | None = None, tracemalloc: Path | None = None,
        reconcile_interval: float | None = None, *, baseline: str | None = None,
        scenarios: Iterable[str] = SCENARIOS, baseline_scenarios: Iterable[str] | None = None,
        **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Run the scenarios on the current checkout (and on ``baseline``'s code); a JSON-able report.

    The current side's scenario results are at the top level (``latency``, ``burst``, ``memory``,
    ``reconciles``, ``cpu``, ``api``, ``cycles``), the baseline's under ``baseline``; ``markdown`` holds the
    side-by-side tables.
    """
    opts = Options.for_size(size, resync_interval=reconcile_interval, tracemalloc=tracemalloc, **overrides)
    chosen = [s for s in SCENARIOS if s in set(scenarios)]
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-operator-")))
        workdir.mkdir(parents=True, exist_ok=True)
        sides = [current_side()]
        if baseline:
            sides.insert(0, stack.enter_context(baseline_side(baseline, workdir)))
        only = None if baseline_scenarios is None else set(baseline_scenarios)
        ran = asyncio.run(run_sides(sides, opts, chosen, workdir, only))
    by_label = ran["results"]
    flat = {label: _flatten(by_label[label]) for label in by_label}
    ordered = [flat[s.label] for s in sides]
    report: dict[str, Any] = {
        "size": size,
        "setup": "operator in a child process (kopf, project handlers, INFO log to a file); kmock emulator "
                 "in the parent process; both on this machine's cores; loopback HTTP",  # fmt: skip
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()},
        "scenarios": chosen,
        "baseline_scenarios": chosen if baseline_scenarios is None else [c for c in chosen if c in set(baseline_scenarios)],
        **flat["current"],
        "sides": {s.label: {"ref": s.ref, "commit": s.commit, "dirty": s.dirty,
                            "imported_from": flat[s.label].get("imported_from")} for s in sides},  # fmt: skip
        "order": ran["order"],
        "scenario_seconds": ran["seconds"],
        "seconds": time.monotonic() - began,
        "markdown": operator_report.markdown([_nested(r) for r in ordered], [s.describe() for s in sides]),
    }
    if baseline:
        report["baseline"] = flat["baseline"]
    return report


def _flatten(by_scenario: dict[str, Any]) -> dict[str, Any]:
    """``load``'s keys at the top (the shape bench/run.py and older readers know), ``cycles`` under its name."""
    out = dict(by_scenario.get("load") or {})
    if "cycles" in by_scenario:
        out["cycles"] = by_scenario["cycles"]
    return out


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    return {"load": {k: v for k, v in flat.items() if k != "cycles"} if "latency" in flat else None,
            "cycles": flat.get("cycles")}  # fmt: skip


def with_facts(report: dict[str, Any], workdir: Path | None = None) -> dict[str, Any]:
    """The report plus machine facts, package versions, the time and the command's commits."""
    return {
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine.facts(workdir),
        "versions": machine.versions(),
        "load_average": list(os.getloadavg()),
        **report,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="the operator benchmark alone (bench/run.py runs it too)")
    parser.add_argument("size", nargs="?", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--baseline", metavar="REF", help="also run the code at this git ref, side by side")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--baseline-scenarios", metavar="LIST",
                        help="the scenarios the baseline runs too (default: all of --scenarios)")  # fmt: skip
    parser.add_argument("--latency-models", type=int, help="models created one at a time")
    parser.add_argument("--burst-models", type=int, help="models created at once")
    parser.add_argument("--cycles", type=int, help="create/delete cycles (full: 10,000)")
    parser.add_argument("--cycle-batch", type=int, help="models created, then deleted, at a time")
    parser.add_argument("--cycle-until", choices=sorted(STAGES),
                        help="each cycle's models are deleted at this stage (default ready)")  # fmt: skip
    parser.add_argument("--resync-interval", type=float,
                        help="VLLM_OPERATOR_RECONCILE_INTERVAL_SECONDS for both sides (s)")  # fmt: skip
    parser.add_argument("--idle-window", type=float, help="seconds idle after the burst (default resync + 5)")
    parser.add_argument("--burst-timeout", type=float, help="seconds the burst may take to be all Ready (300)")
    parser.add_argument("--env", action="append", default=[], metavar="VLLM_OPERATOR_X=V",
                        help="another operator variable for both sides (repeatable)")  # fmt: skip
    parser.add_argument("--tracemalloc", type=Path, help="diagnostics: the operator's top allocations go here")
    parser.add_argument("--workdir", type=Path, help="logs and the baseline worktree (default: temporary)")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="write the report here ('-': nowhere)")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    baseline_scenarios = None
    if args.baseline_scenarios is not None:
        baseline_scenarios = [s.strip() for s in args.baseline_scenarios.split(",") if s.strip()]
        if set(baseline_scenarios) - set(scenarios):
            parser.error("--baseline-scenarios: each must be one of --scenarios")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("VLLM_OPERATOR_"):
            parser.error(f"--env {item!r}: expected VLLM_OPERATOR_NAME=VALUE")
        env[key] = value
    report = with_facts(run(
        args.size, args.workdir, args.tracemalloc, args.resync_interval, baseline=args.baseline,
        scenarios=scenarios, baseline_scenarios=baseline_scenarios, latency_models=args.latency_models, burst_models=args.burst_models,
        cycles=args.cycles, cycle_batch=args.cycle_batch, cycle_until=args.cycle_until, idle_window=args.idle_window, burst_timeout=args.burst_timeout, env=env or None,
    ), args.workdir)  # fmt: skip
    print(report["markdown"])
    print(f"\n{report['size']} size, {report['seconds']:.0f} s; per scenario: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in report["scenario_seconds"].items()))  # fmt: skip
    if str(args.json) != "-":
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(report["markdown"] + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # kopf/aiohttp leftovers in threads must not delay the exit
