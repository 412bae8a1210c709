"""Loopback Hub fixtures: tiny generated models served by ``vllm_runtime.devhub`` on a free port.

huggingface_hub reads ``HF_ENDPOINT`` once, at import. The runtime's cache command therefore passes the
endpoint explicitly (read from the environment when it runs), so in-process calls see ``hub_environ``'s
monkeypatched variables; subprocesses get ``hub_env``, a full environment for ``subprocess``.
Both point ``HF_HOME`` at a temporary directory and drop any ``HF_TOKEN``, so no real token or cache of
the machine is ever used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_runtime.devhub.server import DevHub
from vllm_runtime.devhub.tiny_model import generate

TINY_REPO = "test-org/tiny-llama"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Llama (safetensors only), generated once per test session."""
    return generate(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_with_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with both model.safetensors and pytorch_model.bin (skipped without torch)."""
    pytest.importorskip("torch")
    return generate(tmp_path_factory.mktemp("tiny-model-bin"), with_bin=True)


@pytest.fixture
def devhub() -> Iterator[DevHub]:
    """A fresh, empty loopback Hub on a free port; stopped (and stalls released) after the test."""
    with DevHub() as hub:
        yield hub


@pytest.fixture
def tiny_repo(devhub: DevHub, tiny_model_dir: Path) -> tuple[str, str]:
    """``TINY_REPO`` on ``devhub``: returns (repo_id, commit of main)."""
    return TINY_REPO, devhub.add_repo(TINY_REPO, tiny_model_dir)


def hub_environment(hub: DevHub, home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that point huggingface_hub at ``hub`` and isolate it from the machine."""
    env = dict(os.environ if base is None else base)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        env.pop(key, None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def hub_env(devhub: DevHub, tmp_path: Path) -> dict[str, str]:
    """A full environment (for ``subprocess``) that talks to ``devhub``."""
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    return hub_environment(devhub, home)


@pytest.fixture
def hub_environ(devhub: DevHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process's environment at ``devhub`` (restored after the test)."""
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    env = hub_environment(devhub, home)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    return env
