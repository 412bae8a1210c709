"""Cold download rate and warm check time: ``vllm-runtime cache`` vs plain ``snapshot_download``.

Generates a model of ``--size`` (default 1 GiB, sharded safetensors) and serves it from the loopback Hub
(``vllm_runtime.devhub``) on this machine. Then, one after another, each as a fresh subprocess (so
interpreter start-up and imports count for both), against the same server and the same files:

- ``vllm-runtime cache`` (``python -m vllm_runtime.cache``) into an empty cache: cold (download + sha256
  verification + manifest); then again on branch ``main`` (warm: one revision request) and on the commit
  (warm: no request at all);
- ``huggingface_hub.snapshot_download`` of the same files (``allow_patterns`` = the model's files) into
  another empty cache: cold, then warm on ``main`` (it lists the tree and HEADs nothing once cached).

Each round runs both tools, ``vllm-runtime cache`` first in even rounds and ``snapshot_download`` first in
odd ones, and reports its own ratio of cold times (every round, never only the best).

Both use 8 parallel file downloads (huggingface_hub's default). The Hub's files are hashed once at start,
which also puts them in the page cache, so the server side reads from memory for both tools.

    python bench/cache_bench.py [--size 1GiB] [--rounds 1] [--workdir /tmp/cache-bench] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_runtime.devhub.server import DevHub
from vllm_runtime.devhub.tiny_model import generate, parse_size

REPO = "bench-org/model-1g"
SNAPSHOT_SCRIPT = """
import json, sys, time
from huggingface_hub import snapshot_download
began = time.monotonic()
path = snapshot_download(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3], allow_patterns=json.loads(sys.argv[4]),
                         max_workers=8)
print(json.dumps({"path": path, "inner_seconds": time.monotonic() - began}))
"""


def _env(hub: DevHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1")
    return env


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def _ours(cache: Path, revision: str, env: dict[str, str]) -> dict[str, Any]:
    seconds, out = _timed(
        [sys.executable, "-m", "vllm_runtime.cache", "--model", REPO, "--revision", revision,
         "--cache-dir", str(cache), "--termination-message-path", str(cache.parent / "termination.json")], env
    )
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall_seconds": round(seconds, 3), "inner_seconds": result["durationSeconds"],
            "downloaded_bytes": result["downloadedBytes"], "reused": result["reused"], "commit": result["commit"]}


def _plain(cache: Path, revision: str, patterns: list[str], env: dict[str, str]) -> dict[str, Any]:
    seconds, out = _timed(
        [sys.executable, "-c", SNAPSHOT_SCRIPT, REPO, revision, str(cache), json.dumps(patterns)], env
    )
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall_seconds": round(seconds, 3), "inner_seconds": round(result["inner_seconds"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("500MB"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cache-bench")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()

    model_dir = args.workdir / f"model-{args.size}"
    if not (model_dir / "config.json").exists():
        print(f"generating a {args.size / 2**30:.2f} GiB model in {model_dir} ...", flush=True)
        generate(model_dir, target_bytes=args.size, shard_bytes=args.shard_size)
    model_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())

    rounds: list[dict[str, Any]] = []
    with DevHub() as hub:
        commit = hub.add_repo(REPO, model_dir)
        print(f"serving {REPO}@{commit} ({model_bytes / 1e9:.3f} GB) on {hub.url}", flush=True)
        for round_no in range(args.rounds):
            scratch = args.workdir / "run"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            env = _env(hub, scratch / "hf-home")
            ours_cache, plain_cache = scratch / "ours", scratch / "plain"
            patterns = [str(p.relative_to(model_dir)) for p in sorted(model_dir.iterdir()) if p.is_file()]

            def run_ours() -> dict[str, Any]:
                cold = _ours(ours_cache, "main", env)
                return {"cold": cold, "warm_branch": _ours(ours_cache, "main", env),
                        "warm_commit": _ours(ours_cache, commit, env)}  # fmt: skip

            def run_plain() -> dict[str, Any]:
                hub.clear_log()
                cold = _plain(plain_cache, "main", patterns, env)
                warm = _plain(plain_cache, "main", patterns, env)
                return {"cold": cold, "warm_branch": warm, "requests": len(hub.repo_requests())}

            # The order alternates per round, so neither tool always runs on the colder (or warmer) machine.
            first = "ours" if round_no % 2 == 0 else "plain"
            if first == "ours":
                ours, plain = run_ours(), run_plain()
            else:
                plain, ours = run_plain(), run_ours()
            cold, plain_cold = ours["cold"], plain["cold"]
            manifest = json.loads((ours_cache / "manifests" / "models--bench-org--model-1g" / f"{commit}.json")
                                  .read_text())
            if sorted(f["path"] for f in manifest["files"]) != sorted(patterns):
                raise SystemExit(f"the tools cached different files: {manifest['files']} vs {patterns}")
            total = manifest["bytes"]
            row = {
                "round": round_no,
                "first": first,
                "bytes": total,
                "ours_cold": cold | {"rate_MBps": round(total / cold["wall_seconds"] / 1e6, 1),
                                     "verification_seconds": manifest["verificationSeconds"]},
                "ours_warm_branch": ours["warm_branch"],
                "ours_warm_commit": ours["warm_commit"],
                "plain_cold": plain_cold | {"rate_MBps": round(total / plain_cold["wall_seconds"] / 1e6, 1)},
                "plain_warm_branch": plain["warm_branch"],
                "plain_requests_cold_plus_warm": plain["requests"],
                "cold_ratio_wall": round(cold["wall_seconds"] / plain_cold["wall_seconds"], 3),
                "cold_ratio_in_process": round(cold["inner_seconds"] / plain_cold["inner_seconds"], 3),
            }
            rounds.append(row)
            print(json.dumps(row, indent=1), flush=True)
            shutil.rmtree(scratch, ignore_errors=True)

    print("\n| run | what | wall s | in-process s | rate MB/s |")
    print("|---|---|---|---|---|")
    for row in rounds:
        print(f"| {row['round']} | cold, ours / snapshot_download ({row['first']} first) | "
              f"{row['cold_ratio_wall']:.3f}x | {row['cold_ratio_in_process']:.3f}x | |")
        for key, label in (("ours_cold", "vllm-runtime cache, cold (download + sha256 + manifest)"),
                           ("plain_cold", "snapshot_download, cold"),
                           ("ours_warm_branch", "vllm-runtime cache, warm, revision main"),
                           ("ours_warm_commit", "vllm-runtime cache, warm, commit"),
                           ("plain_warm_branch", "snapshot_download, warm, revision main")):
            r = row[key]
            print(f"| {row['round']} | {label} | {r['wall_seconds']:.2f} | {r['inner_seconds']:.3f} | "
                  f"{r.get('rate_MBps', '')} |")
    if args.out:
        args.out.write_text(json.dumps({"model_bytes": model_bytes, "rounds": rounds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
