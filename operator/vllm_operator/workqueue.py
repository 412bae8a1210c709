"""One work queue of VLLMModel keys: the only place that decides when a model is reconciled.

The semantics are client-go's workqueue (what controller-runtime operators use), in asyncio:

- **Deduplicated**: a key added while it is already waiting is added once; a burst of watch events
  for one model (its Job, its Pod, its own status echo) ends in one reconcile of the newest state.
- **One at a time per key**: a key added while it is being processed is not handed to a second
  worker; it is queued again when the first run ends, so the newest state is always looked at.
- **Delayed adds**: ``add_after`` (a time-based rule of the plan: "look again in 30 s") keeps only the
  earliest pending timer per key.
- **Backoff**: ``retry`` re-adds a key after ``min(cap, base * 2**failures)`` scaled by a jitter in
  [0.5, 1.0), so many models failing together do not retry in lockstep; ``forget`` resets it.

A key's entries live only while the key is queued, running, waiting on a timer or failing: ``drop``
removes everything about a key, so nothing outlives its model.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with a cap and jitter: the delay before retry number ``failures + 1``."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, failures: int, *, rng: Callable[[], float] = random.random) -> float:
        full = min(self.cap, self.base * 2.0 ** min(failures, 32))
        return float(full * (0.5 + 0.5 * rng()))


class WorkQueue(Generic[K]):
    """Keys waiting to be processed by ``workers`` concurrent calls of ``process``."""

    def __init__(self, process: Callable[[K], Awaitable[None]], *, workers: int = 16,
                 backoff: Backoff = Backoff()) -> None:  # fmt: skip
        self._process = process
        self._workers = max(1, workers)
        self.backoff = backoff
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._dirty: set[K] = set()  # waiting in the queue, or to be queued again after its run
        self._processing: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # --- feeding ---------------------------------------------------------------------------------------

    def add(self, key: K) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Add ``key`` in ``delay`` seconds; an earlier pending timer for it wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def retry(self, key: K) -> float:
        """Add ``key`` again after its backoff delay; the delay chosen."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = self.backoff.delay(failures)
        self.add_after(key, delay)
        return delay

    def failures(self, key: K) -> int:
        """How many times in a row ``key`` has been retried since its last success."""
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(key, None)

    def drop(self, key: K) -> None:
        """Forget everything about ``key`` (its model is gone); a run in progress still finishes."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    # --- introspection (tests, benchmarks) -------------------------------------------------------------

    def __len__(self) -> int:
        """Keys known to the queue in any way: waiting, running, on a timer or failing."""
        return len(self._dirty | self._processing | set(self._timers) | set(self._failures))

    async def idle(self) -> None:
        """Wait until nothing is queued or running (timers may still be pending)."""
        await self._queue.join()

    # --- running ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}")
                           for i in range(self._workers)]  # fmt: skip

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._dirty.discard(key)
            self._processing.add(key)
            try:
                await self._process(key)
            except Exception:  # noqa: BLE001 - ``process`` handles its errors; a bug must not kill a worker
                _log.exception(f"processing {key!r} failed")
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._queue.put_nowait(key)
                self._queue.task_done()
