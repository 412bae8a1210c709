"""Every metric the chart's alerts and dashboard name is one the operator or the runtime really exports.

Checked against real scrapes, not a hand-kept list: the operator's /metrics endpoint, a running
``vllm-runtime cache`` (held mid-download by the loopback Hub), and, end to end, a model served by
``vllm-runtime serve`` on real vLLM (``served_tiny_model`` of tests/vllm_fixtures.py).
A family that has no sample yet (a labelled metric nobody touched) counts: its ``# TYPE`` line is scraped.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache_helpers import cache_command
from chart_metrics import chart_metric_names, exported_names
from vllm_fixtures import ServedModel
from vllm_runtime.devhub.server import DevHub, Fault

CHART_NAMES = chart_metric_names()


def _serve_metrics_on_a_gpu() -> set[str]:
    """Names the serve metrics export when NVML sees a GPU (this machine has none): same code, one fake device."""
    from vllm_runtime.metrics import GpuMemory, Nvml, ServeMetrics

    class OneGpu(Nvml):
        def devices(self) -> list[GpuMemory] | None:
            return [GpuMemory(index=0, name="NVIDIA L4", uuid="GPU-0", total=24 << 30, free=4 << 30, used=20 << 30,
                              reserved=0)]

    return exported_names(ServeMetrics(nvml=OneGpu()).exposition().decode())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError):
            if process is not None and process.poll() is not None:
                raise AssertionError(f"the process exited ({process.returncode}) before {url} answered") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def operator_scrape() -> str:
    from vllm_operator import metrics

    port = _free_port()
    server = metrics.serve(port, "127.0.0.1")
    try:
        return _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()


@pytest.fixture
def cache_scrape(devhub: DevHub, tiny_repo: tuple[str, str], hub_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """/metrics of a real `vllm-runtime cache` run, scraped while the Hub holds its weight download."""
    repo_id, _commit = tiny_repo
    devhub.inject(Fault(kind="delay", path="*/resolve/*.safetensors", method="GET", times=None, seconds=3))
    port = _free_port()
    command = cache_command(tmp_path / "cache", repo_id, "--metrics-port", str(port))
    process = subprocess.Popen(command, env=hub_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield _scrape(f"http://127.0.0.1:{port}/metrics", process=process)
    finally:
        devhub.clear_faults()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_chart_names_metrics_of_every_component() -> None:
    assert any(name.startswith("vllm_operator_") for name in CHART_NAMES)
    assert any(name.startswith("vllm_runtime_cache_") for name in CHART_NAMES)
    assert any(name.startswith("vllm:") for name in CHART_NAMES)
    assert "vllm_runtime_ready" in CHART_NAMES


def test_operator_metrics_named_by_the_chart_are_exported(operator_scrape: str) -> None:
    wanted = {name for name in CHART_NAMES if name.startswith("vllm_operator_")}
    missing = wanted - exported_names(operator_scrape)
    assert not missing, {name: sorted(CHART_NAMES[name]) for name in missing}


def test_cache_metrics_named_by_the_chart_are_exported_by_a_cache_run(cache_scrape: str) -> None:
    wanted = {name for name in CHART_NAMES if name.startswith("vllm_runtime_cache_")}
    missing = wanted - exported_names(cache_scrape)
    assert not missing, {name: sorted(CHART_NAMES[name]) for name in missing}


@pytest.mark.e2e
def test_every_metric_named_by_the_chart_is_exported(
    served_tiny_model: ServedModel, operator_scrape: str, cache_scrape: str
) -> None:
    serve_scrape = _scrape(served_tiny_model.metrics + "/metrics")
    exported = exported_names(operator_scrape) | exported_names(cache_scrape) | exported_names(serve_scrape)
    if "vllm_runtime_gpu_metrics_available 0" in serve_scrape:
        exported |= {n for n in _serve_metrics_on_a_gpu() if n.startswith("vllm_runtime_gpu_")}
    missing = set(CHART_NAMES) - exported
    assert not missing, {name: sorted(CHART_NAMES[name]) for name in missing}
