"""Helpers for the cache tests: run the cache in process or as a subprocess against the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_runtime import summary
from vllm_runtime.cache import CacheOptions, run_cache
from vllm_runtime.layout import CacheLayout


def cache_in_process(cache_dir: Path, model: str, revision: str = "main", **options: Any) -> summary.Summary:
    """Run the cache step in this process; fast retries so fault tests stay quick."""
    defaults: dict[str, Any] = {
        "retry_backoff": 0.05,
        "stall_timeout": 5.0,
        "progress_interval": 0.5,
        "endpoint": os.environ.get("HF_ENDPOINT"),
        "token": os.environ.get("HF_TOKEN") or None,
    }
    return run_cache(CacheOptions(model=model, cache_dir=cache_dir, revision=revision, **(defaults | options)))


@dataclass
class CacheRun:
    returncode: int
    stdout: str
    stderr: str
    termination: dict[str, Any] | None


def cache_command(cache_dir: Path, model: str, *extra: str, revision: str = "main") -> list[str]:
    return [
        sys.executable, "-m", "vllm_runtime.cache",
        "--model", model, "--revision", revision, "--cache-dir", str(cache_dir),
        "--termination-message-path", str(cache_dir.parent / f"termination-{os.getpid()}-{id(extra)}.json"),
        "--retry-backoff", "0.05", *extra,
    ]


def cache_subprocess(
    cache_dir: Path, model: str, env: dict[str, str], *extra: str, revision: str = "main", timeout: float = 120
) -> CacheRun:
    command = cache_command(cache_dir, model, *extra, revision=revision)
    termination = Path(command[command.index("--termination-message-path") + 1])
    termination.unlink(missing_ok=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    message = summary.parse_termination_message(termination.read_text()) if termination.exists() else None
    return CacheRun(done.returncode, done.stdout, done.stderr, message)


def manifest_path(cache_dir: Path, repo_id: str, commit: str) -> Path:
    return CacheLayout(cache_dir).manifest_path(repo_id, commit)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
