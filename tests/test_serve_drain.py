"""Draining on SIGTERM: the pod leaves the endpoints (``/ready`` fails) before it stops taking requests.

Against the stand-in vLLM (tests/fake_vllm.py): right after SIGTERM ``/ready`` answers 503 while the
API still answers, and vLLM gets its own SIGTERM only after ``--endpoint-drain-seconds``. The same
with real vLLM and requests in flight: tests/test_autoscaling_prometheus.py (its last test).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from test_serve_unit import COMMIT, REPO, fill_cache_by_hand, wait_for

from vllm_runtime.demo import ServeProcess, http_status

HERE = Path(__file__).parent
DRAIN_SECONDS = 2.0


@dataclass
class FakeVllmServe(ServeProcess):
    """``vllm-runtime serve`` of the stand-in vLLM, with ``serve`` options before the ``--``."""

    serve_flags: tuple[str, ...] = ()

    def command(self) -> list[str]:
        cmd = super().command()
        cut = cmd.index("--")
        return [*cmd[:cut], "--vllm-command", f"{sys.executable} {HERE / 'fake_vllm.py'}", *self.serve_flags, *cmd[cut:]]


def serve_fake(tmp_path: Path, *serve_flags: str) -> FakeVllmServe:
    fill_cache_by_hand(tmp_path)
    server = FakeVllmServe(
        model=REPO, revision=COMMIT, cache_dir=tmp_path, log_path=tmp_path / "serve.log", vllm_args=(),
        serve_flags=serve_flags,
    )  # fmt: skip
    server.start().wait_ready(timeout=60)
    return server


def test_sigterm_fails_readiness_at_once_and_keeps_serving_for_the_drain_period(tmp_path: Path) -> None:
    server = serve_fake(tmp_path, "--endpoint-drain-seconds", str(DRAIN_SECONDS))
    assert server.proc is not None
    try:
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: http_status(server.metrics + "/ready") == 503, timeout=DRAIN_SECONDS)
        assert time.monotonic() - signalled < DRAIN_SECONDS  # out of the endpoints first ...
        assert http_status(server.metrics + "/live") == 200  # draining is not dying: no liveness restart
        # ... while vLLM still takes new requests for (most of) the drain period, and /ready stays failed
        answers, readiness = [], set()
        while time.monotonic() - signalled < 0.8 * DRAIN_SECONDS:
            answers.append(http_status(server.api + "/v1/models"))
            readiness.add(http_status(server.metrics + "/ready"))
        assert answers and set(answers) == {200}, answers
        assert readiness == {503}
        assert "[shutdown]" not in server.log_text()  # vLLM has not been told to stop yet
        code = server.proc.wait(timeout=30)
        exited = time.monotonic()
    finally:
        server.stop()
    assert code == 0, server.log_text()
    assert exited - signalled >= DRAIN_SECONDS  # vLLM was not stopped before the drain period ended
    lines = server.log_text().splitlines()
    keeps_serving = next(i for i, line in enumerate(lines) if "keeps serving" in line)
    forwarded = next(i for i, line in enumerate(lines) if "forwarding SIGTERM" in line)
    shutdown = next(i for i, line in enumerate(lines) if "[shutdown] API server: shutdown triggered" in line)
    assert keeps_serving < forwarded < shutdown


def test_without_a_drain_period_vllm_is_stopped_at_once(tmp_path: Path) -> None:
    server = serve_fake(tmp_path, "--endpoint-drain-seconds", "0")
    code = server.stop()
    assert code == 0, server.log_text()
    log = server.log_text()
    assert "received SIGTERM" in log and "forwarding SIGTERM" in log and "keeps serving" not in log


def test_sigterm_taken_by_another_thread_of_serve_still_starts_the_drain(tmp_path: Path) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads (here: one that is not the main thread,
    by signalling that thread's id); Python runs the handler only when the main thread runs Python code,
    so serve must not sit in a bare waitpid() until vLLM exits."""
    server = serve_fake(tmp_path, "--endpoint-drain-seconds", str(DRAIN_SECONDS))
    assert server.proc is not None
    try:
        pid = server.proc.pid
        threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if int(t.name) != pid]
        assert threads, "serve runs helper threads (vLLM output, readiness, metrics)"
        signalled = time.monotonic()
        os.kill(threads[0], signal.SIGTERM)  # kill(2) with a thread id: that thread is tried first
        wait_for(lambda: http_status(server.metrics + "/ready") == 503, timeout=DRAIN_SECONDS)
        assert time.monotonic() - signalled < DRAIN_SECONDS
        assert http_status(server.api + "/v1/models") == 200
        code = server.proc.wait(timeout=30)
    finally:
        server.stop()
    assert code == 0, server.log_text()
    assert time.monotonic() - signalled >= DRAIN_SECONDS
