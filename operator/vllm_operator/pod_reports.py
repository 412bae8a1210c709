"""What each ready model pod's runtime says about its LoRA adapters: ``GET http://<podIP>:9090/status``.

Model pods have no Kubernetes API rights, so their adapter state (loaded, failed and why) reaches the
operator over HTTP from ``vllm-runtime serve``'s metrics port (the ``adapters`` section of ``/status``,
``vllm_runtime.adapters.converge.AdapterConverger.status``). Only models with ``spec.adapters`` are read.

- **Never on the reconcile's path.** ``snapshot`` returns what the last reads found, at once, and starts a
  read of the given pods in the background when none is running and the pod set changed or the last read
  is older than ``min_interval``; when the answers change, ``on_change`` queues the model again. So reads
  happen after pod changes (their watch events reconcile the model), on the resync timer and on the plan's
  requeue hints, and the event loop never waits for a pod.
- **Bounded.** Each read has a total timeout; at most ``concurrency`` reads run at once over all models;
  an answer larger than ``MAX_BYTES`` is refused.
- **Unknown is not loaded.** A pod that does not answer, answers an error, or answers without an
  ``adapters`` section is reported as ``{"ok": False, "error": ...}``: it replaces whatever that pod said
  before, so the status never keeps saying "loaded" after a read that could not confirm it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import builders
from .diagnose import metadata_of

JSON = dict[str, Any]
Key = tuple[str, str]

MAX_BYTES = 1 << 20
DEFAULT_TIMEOUT = 3.0
DEFAULT_CONCURRENCY = 16
DEFAULT_MIN_INTERVAL = 5.0

_log = logging.getLogger(__name__)


def status_url(pod: Mapping[str, Any]) -> str:
    """The runtime's /status on the pod's metrics port."""
    ip = str((pod.get("status") or {}).get("podIP") or "")
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{builders.RUNTIME_METRICS_PORT}/status"


def is_ready_server(pod: Mapping[str, Any]) -> bool:
    """A model server pod that is Ready, has an IP and is not being deleted."""
    meta = metadata_of(pod)
    if (meta.get("labels") or {}).get("app.kubernetes.io/component") != builders.COMPONENT_SERVER:
        return False
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _pod_id(pod: Mapping[str, Any]) -> tuple[str, str]:
    return str(metadata_of(pod).get("name")), str((pod.get("status") or {}).get("podIP"))


@dataclass
class _ModelReads:
    reports: dict[str, JSON] = field(default_factory=dict)  # pod name -> its last report
    pods: frozenset[tuple[str, str]] = frozenset()  # (name, IP) of the pods last read
    read_at: float | None = None  # loop time the last read started
    task: asyncio.Task[None] | None = None


class PodReports:
    def __init__(
        self,
        *,
        on_change: Callable[[Key], None] = lambda key: None,
        url_for: Callable[[Mapping[str, Any]], str] = status_url,
        timeout: float = DEFAULT_TIMEOUT,
        concurrency: int = DEFAULT_CONCURRENCY,
        min_interval: float = DEFAULT_MIN_INTERVAL,
    ) -> None:
        self.on_change = on_change
        self.url_for = url_for
        self.timeout = timeout
        self.min_interval = min_interval
        self._limit = asyncio.Semaphore(max(1, concurrency))
        self._models: dict[Key, _ModelReads] = {}
        self._session: aiohttp.ClientSession | None = None

    def snapshot(self, key: Key, pods: Sequence[Mapping[str, Any]]) -> dict[str, JSON]:
        """The last report of each of ``pods`` (ready server pods) that has one; starts a read when due."""
        reads = self._models.setdefault(key, _ModelReads())
        wanted = frozenset(_pod_id(p) for p in pods)
        loop = asyncio.get_running_loop()
        due = wanted != reads.pods or reads.read_at is None or loop.time() - reads.read_at >= self.min_interval
        if due and (reads.task is None or reads.task.done()) and (pods or reads.reports):
            reads.read_at = loop.time()
            reads.pods = wanted
            reads.task = loop.create_task(self._read_all(key, [dict(p) for p in pods]))
        names = {name for name, _ in wanted}
        return {name: report for name, report in reads.reports.items() if name in names and
                (name, report.get("podIP")) in wanted}  # fmt: skip

    async def _read_all(self, key: Key, pods: list[JSON]) -> None:
        results = await asyncio.gather(*(self._read(p) for p in pods))
        reads = self._models.get(key)
        if reads is None:  # forgotten meanwhile
            return
        fresh = {str(metadata_of(p).get("name")): r for p, r in zip(pods, results, strict=True)}
        if fresh != reads.reports:
            reads.reports = fresh
            self.on_change(key)

    async def _read(self, pod: Mapping[str, Any]) -> JSON:
        ip = str((pod.get("status") or {}).get("podIP"))
        url = self.url_for(pod)
        async with self._limit:
            try:
                session = self._connect()
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    body = await resp.content.read(MAX_BYTES + 1)
                    if resp.status != 200:
                        return {"ok": False, "podIP": ip, "error": f"{url} answered HTTP {resp.status}"}
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                return {"ok": False, "podIP": ip, "error": f"{url} did not answer: {type(exc).__name__}: {exc}"[:300]}
        if len(body) > MAX_BYTES:
            return {"ok": False, "podIP": ip, "error": f"{url} answered more than {MAX_BYTES} bytes"}
        try:
            data = json.loads(body)
        except ValueError:
            return {"ok": False, "podIP": ip, "error": f"{url} did not answer JSON"}
        adapters = data.get("adapters") if isinstance(data, dict) else None
        if not isinstance(adapters, dict):
            return {"ok": False, "podIP": ip, "error": f"{url} has no adapters section (is serve running with "
                    "--adapters-file, from a runtime image with LoRA support?)"}  # fmt: skip
        return {"ok": True, "podIP": ip, "adapters": adapters}

    def _connect(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def forget(self, key: Key) -> None:
        reads = self._models.pop(key, None)
        if reads is not None and reads.task is not None:
            reads.task.cancel()

    def tracked(self) -> set[Key]:
        return set(self._models)

    async def close(self) -> None:
        for key in list(self._models):
            self.forget(key)
        if self._session is not None:
            await self._session.close()
            self._session = None
