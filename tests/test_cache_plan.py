"""``vllm-runtime cache --plan-*``: the cache Job also plans GPU memory from the files it cached.

The operator passes the spec's planner inputs as ``--plan-*`` flags (``planner.spec.plan_flags``) and
reads the plan back from the termination message (``plan``), for models it cannot plan itself
(gated, Hub unreachable from the operator, pvc://).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllm_runtime import cli, summary
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.planner import spec as plan_spec


def run_cache(cache: Path, model: str, *flags: str) -> tuple[int, dict[str, Any]]:
    termination = cache.parent / "termination.json"
    code = cli.main(["cache", "--model", model, "--cache-dir", str(cache), "--retry-backoff", "0.05",
                     "--termination-message-path", str(termination), *flags])  # fmt: skip
    message = summary.parse_termination_message(termination.read_text())
    assert message is not None
    return code, message


def test_plan_flags_round_trip_through_the_cache_parser() -> None:
    spec = {"gpu": {"memory": "24Gi"}, "quantization": "awq", "kvCacheDtype": "fp8", "maxModelLen": "auto",
            "tensorParallelSize": 2, "gpuMemoryUtilization": 0.85, "enforceEager": True}  # fmt: skip
    flags = plan_spec.plan_flags(spec)
    assert flags[:2] == ["--plan-gpu-memory", str(24 * 2**30)]
    assert "--plan-max-model-len" in flags and "--plan-kv-cache-dtype" in flags and "--plan-enforce-eager" in flags
    args = cli.build_parser().parse_args(["cache", "--model", "org/x", "--cache-dir", "/c", *flags])
    assert plan_spec.plan_kwargs_from_args(args) == plan_spec.plan_kwargs(spec)
    assert plan_spec.plan_flags({"model": "org/x"}) == [], "no spec.gpu: no plan"
    assert plan_spec.plan_kwargs({"gpu": {"type": "L4"}, "tensorParallelSize": "auto"}) == {
        "gpu": "L4", "gpu_memory_bytes": None, "tensor_parallel_size": "auto"}  # fmt: skip


def test_cache_reports_the_plan_of_the_cached_files(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    repo_id, commit = tiny_repo
    cache = tmp_path / "cache"
    code, message = run_cache(cache, repo_id, "--plan-gpu", "L4", "--plan-max-model-len", "auto")
    assert code == summary.EXIT_OK and message["ok"] is True and message["commit"] == commit
    plan = message["plan"]
    assert plan["fits"] is True and plan["gpu"] == "L4" and plan["weightBytes"] > 0
    assert plan["chosen"]["maxModelLen"] == plan["maxModelLen"], "auto is filled and said so"

    # Too small a GPU: the cache still succeeds (the operator decides); the plan says why and what fits.
    code, message = run_cache(cache, repo_id, "--plan-gpu-memory", "1000000")
    assert code == summary.EXIT_OK and message["ok"] is True
    assert message["plan"]["fits"] is False and message["plan"]["reason"]
    assert len(json.dumps(message)) <= summary.MAX_TERMINATION_MESSAGE_BYTES


def test_cache_without_plan_flags_has_no_plan(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    code, message = run_cache(tmp_path / "cache", tiny_repo[0])
    assert code == summary.EXIT_OK and "plan" not in message


def test_a_plan_that_cannot_be_made_never_fails_the_cache(tmp_path: Path) -> None:
    result = summary.Summary(ok=True, command="cache", model="org/x", revision="main", commit="c" * 40)
    from vllm_runtime.cache.command import plan_cached

    plan_cached(result, tmp_path, {"gpu": "L4"})  # no such snapshot
    assert result.extra["plan"]["fits"] is None and "error" in result.extra["plan"]


def test_bad_plan_flag_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["cache", "--model", "org/x", "--cache-dir", str(tmp_path), "--plan-gpu", "L4",
                     "--plan-max-model-len", "long"])  # fmt: skip
    assert code == summary.EXIT_USAGE
    assert "--plan-max-model-len" in capsys.readouterr().err
