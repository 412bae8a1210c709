"""The work queue every reconcile goes through: deduplication, one run per key, delays, backoff."""

from __future__ import annotations

import asyncio

import pytest

from vllm_operator.workqueue import Backoff, WorkQueue


async def _until(check: object, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_a_key_added_many_times_while_waiting_runs_once() -> None:
    runs: list[str] = []

    async def process(key: str) -> None:
        runs.append(key)

    queue: WorkQueue[str] = WorkQueue(process, workers=4)
    for _ in range(50):
        queue.add("a")
    queue.add("b")
    queue.start()
    await queue.idle()
    await queue.stop()
    assert sorted(runs) == ["a", "b"]


async def test_a_key_never_runs_twice_at_once_and_an_add_during_a_run_runs_again_after_it() -> None:
    running: set[str] = set()
    overlaps = 0
    runs = 0
    release = asyncio.Event()

    async def process(key: str) -> None:
        nonlocal overlaps, runs
        overlaps += key in running
        running.add(key)
        runs += 1
        if runs == 1:
            await release.wait()
        running.discard(key)

    queue: WorkQueue[str] = WorkQueue(process, workers=4)
    queue.start()
    queue.add("a")
    await _until(lambda: runs == 1)
    for _ in range(10):  # arrive while the first run is in progress: they coalesce into one more run
        queue.add("a")
    await asyncio.sleep(0)  # let idle workers look: none may take "a" while it runs
    assert runs == 1
    release.set()
    await _until(lambda: runs == 2)
    await queue.idle()
    await queue.stop()
    assert (overlaps, runs) == (0, 2)


async def test_add_after_keeps_the_earliest_timer() -> None:
    ran = asyncio.Event()
    queue: WorkQueue[str] = WorkQueue(lambda key: _set(ran), workers=1)
    queue.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue.add_after("a", 30.0)
    queue.add_after("a", 0.05)  # earlier: replaces the 30 s timer
    queue.add_after("a", 10.0)  # later: ignored
    await asyncio.wait_for(ran.wait(), 5)
    assert loop.time() - start < 5
    assert len(queue) == 0, "nothing is left of the key after its run"
    await queue.stop()


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(base=0.5, cap=60.0)
    assert [backoff.delay(n, rng=lambda: 0.999999) for n in range(9)] == pytest.approx(
        [0.5, 1, 2, 4, 8, 16, 32, 60, 60], rel=1e-5
    )
    assert backoff.delay(3, rng=lambda: 0.0) == 2.0  # jitter spreads 4 s over [2, 4)
    assert backoff.delay(10_000, rng=lambda: 0.5) == 45.0  # no overflow far beyond the cap


async def test_retry_backs_off_and_forget_and_drop_reset_it() -> None:
    queue: WorkQueue[str] = WorkQueue(lambda key: _noop(), workers=1, backoff=Backoff(base=100, cap=1000))
    delays = [queue.retry("a") for _ in range(3)]
    assert 50 <= delays[0] < 100 and 100 <= delays[1] < 200 and 200 <= delays[2] < 400
    assert queue.failures("a") == 3
    queue.forget("a")
    assert queue.failures("a") == 0
    queue.retry("b")
    queue.drop("b")  # its model is gone: its timer and its failure count go with it
    queue.drop("a")
    assert len(queue) == 0
    await queue.stop()


async def _noop() -> None:
    return None


async def test_a_failing_process_does_not_kill_the_worker() -> None:
    runs: list[str] = []

    async def process(key: str) -> None:
        runs.append(key)
        if key == "bad":
            raise RuntimeError("a bug")

    queue: WorkQueue[str] = WorkQueue(process, workers=1)
    queue.start()
    queue.add("bad")
    queue.add("good")
    await queue.idle()
    await queue.stop()
    assert runs == ["bad", "good"]
