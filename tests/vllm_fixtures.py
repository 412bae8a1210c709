"""Real-vLLM fixtures: the tiny model cached from the loopback Hub with ``vllm-runtime cache`` and served
with ``vllm-runtime serve`` on vLLM's CPU build, once per session (each start takes 30-60 s here).

The pieces are the demo's own (``vllm_runtime.demo``), so the tests run exactly what the README shows.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_fixtures import TINY_REPO, hub_environment

from vllm_runtime.demo import CPU_ENV, ServeProcess, cache_model
from vllm_runtime.devhub.server import DevHub

READY_TIMEOUT = 900.0  # a cold start compiles; CI machines have 2 cores


def serve_env() -> dict[str, str]:
    """Serving needs no Hub and no token: a pod's environment plus the CPU build's KV cache size."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")}
    return {**env, **CPU_ENV}


@dataclass
class ServedModel:
    repo_id: str
    commit: str
    cache_dir: Path
    workdir: Path
    server: ServeProcess
    cache_summary: dict[str, object]

    @property
    def api(self) -> str:
        return self.server.api

    @property
    def metrics(self) -> str:
        return self.server.metrics

    def new_server(self, name: str, *vllm_args: str, env: dict[str, str] | None = None) -> ServeProcess:
        """Another ``vllm-runtime serve`` of the same cached commit (not started)."""
        return ServeProcess(
            model=self.repo_id,
            revision=self.commit,
            cache_dir=self.cache_dir,
            log_path=self.workdir / f"{name}.log",
            vllm_args=vllm_args or self.server.vllm_args,
            env=serve_env() if env is None else env,
        )


@pytest.fixture(scope="session")
def served_tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServedModel]:
    """The tiny Llama, cached from a loopback Hub and served by ``vllm-runtime serve`` (no --enforce-eager,
    so the first start compiles into the cache volume's compile directory)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    workdir = tmp_path_factory.mktemp("vllm-e2e")
    cache_dir = workdir / "cache"
    with DevHub() as hub:
        commit = hub.add_repo(TINY_REPO, tiny_model_dir)
        home = workdir / "hf-home"
        home.mkdir()
        cached = cache_model(model=TINY_REPO, revision="main", cache_dir=cache_dir, env=hub_environment(hub, home))
    assert cached["commit"] == commit
    server = ServeProcess(
        model=TINY_REPO, revision=commit, cache_dir=cache_dir, log_path=workdir / "serve-1.log", env=serve_env()
    ).start()
    try:
        server.wait_ready(timeout=READY_TIMEOUT)
        yield ServedModel(TINY_REPO, commit, cache_dir, workdir, server, cached)
    finally:
        server.stop()
