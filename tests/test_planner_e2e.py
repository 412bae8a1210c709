"""Live check: the planner's KV block count equals the one vLLM (CPU build) reports for the same memory."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from vllm_runtime.planner import plan_model

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[1] / "bench" / "planner_accuracy.py"


def test_kv_blocks_match_vllm(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    spec = importlib.util.spec_from_file_location("planner_accuracy", BENCH)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    sys.modules["planner_accuracy"] = bench
    spec.loader.exec_module(bench)
    kv_bytes, max_len = 3 * 1024**2 + 4321, 192
    plan = plan_model(str(tiny_model_dir), kv_cache_memory_bytes=kv_bytes, max_model_len=max_len, block_size=bench.CPU_BLOCK_SIZE)
    real = bench.run_vllm(tiny_model_dir, max_len, kv_bytes, tmp_path / "vllm.log")
    assert real["block_size"] == bench.CPU_BLOCK_SIZE
    assert plan.num_blocks == real["num_gpu_blocks"]
    assert real["max_concurrency"] == pytest.approx(plan.num_blocks / math.ceil(max_len / bench.CPU_BLOCK_SIZE), rel=0.01)
