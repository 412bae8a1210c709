"""Planner KV cache blocks vs vLLM's own count, on tiny generated models with vLLM's CPU build.

For each case vLLM starts with ``--kv-cache-memory-bytes`` fixed (so both sides size the same memory),
and its ``vllm:cache_config_info`` metric reports ``num_gpu_blocks``; its log reports the maximum
concurrency at ``--max-model-len``. The planner predicts both from config.json and the headers.

    python bench/planner_accuracy.py [--cases N] [--markdown]

Each vLLM start takes 30-60 s here (--enforce-eager); the default runs 4 starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from vllm_runtime.devhub import tiny_model
from vllm_runtime.planner import plan_model

CPU_BLOCK_SIZE = 128  # vLLM's CPU backend default (platforms/cpu.py) for non-MLA models
MiB = 1024**2
GQA_SHAPE = replace(tiny_model.DEFAULT_SHAPE, num_key_value_heads=2)
WIDE_SHAPE = replace(tiny_model.DEFAULT_SHAPE, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=64, hidden_size=128)
# (model, shape, maxModelLen, kv cache bytes)
CASES = [
    ("tiny-mha", tiny_model.DEFAULT_SHAPE, 256, 8 * MiB),
    ("tiny-mha", tiny_model.DEFAULT_SHAPE, 128, 3 * MiB + 12345),
    ("tiny-gqa", GQA_SHAPE, 256, 5 * MiB),
    ("tiny-mqa-3layer", WIDE_SHAPE, 200, 2 * MiB),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_vllm(model_dir: Path, max_model_len: int, kv_bytes: int, log_path: Path, timeout: float = 400) -> dict:
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
        "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(kv_bytes),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"} | {"HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log_path}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(1)
            else:
                raise RuntimeError(f"vLLM not healthy in {timeout}s; see {log_path}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    line = next(m for m in metrics.splitlines() if m.startswith("vllm:cache_config_info{"))
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    text = log_path.read_text()
    conc = re.search(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    return {
        "num_gpu_blocks": int(labels["num_gpu_blocks"]),
        "block_size": int(labels["block_size"]),
        "max_concurrency": float(conc.group(2)) if conc else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=len(CASES))
    parser.add_argument("--json-out")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        made: dict[str, Path] = {}
        for name, shape, max_len, kv_bytes in CASES[: args.cases]:
            if name not in made:
                made[name] = tiny_model.generate(Path(tmp) / name, shape=shape)
            model_dir = made[name]
            plan = plan_model(str(model_dir), kv_cache_memory_bytes=kv_bytes, max_model_len=max_len, block_size=CPU_BLOCK_SIZE)
            start = time.monotonic()
            real = run_vllm(model_dir, max_len, kv_bytes, Path(tmp) / f"{name}-{max_len}.log")
            assert plan.num_blocks is not None and plan.max_concurrent_sequences is not None
            row = {
                "model": name, "max_model_len": max_len, "kv_cache_memory_bytes": kv_bytes,
                "kv_bytes_per_token": plan.kv_cache_bytes_per_token, "predicted_blocks": plan.num_blocks,
                "vllm_blocks": real["num_gpu_blocks"], "vllm_block_size": real["block_size"],
                "blocks_error": (plan.num_blocks - real["num_gpu_blocks"]) / real["num_gpu_blocks"],
                # vLLM's "maximum concurrency": block-rounded requests that fit in the pool.
                "predicted_concurrency": plan.num_blocks / math.ceil(max_len / CPU_BLOCK_SIZE),
                "predicted_whole_sequences": plan.max_concurrent_sequences,
                "vllm_concurrency": real["max_concurrency"], "start_seconds": round(time.monotonic() - start, 1),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | maxModelLen | KV memory (bytes) | KV bytes/token | predicted blocks | vLLM blocks | error | predicted concurrency | vLLM concurrency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['max_model_len']} | {r['kv_cache_memory_bytes']:,} | {r['kv_bytes_per_token']} | "
            f"{r['predicted_blocks']} | {r['vllm_blocks']} | {r['blocks_error']:+.2%} | "
            f"{r['predicted_concurrency']:.2f}x ({r['predicted_whole_sequences']} whole) | {r['vllm_concurrency']}x |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["blocks_error"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
