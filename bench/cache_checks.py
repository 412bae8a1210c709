"""Warm checks at two model sizes and full re-verification speed (``bench/cache_bench.py`` does the cold race).

- warm: ``vllm_runtime.cache.run_cache`` on a cache that already holds the model, at two model sizes,
  each in a fresh process: its time, the Hub requests it makes (the Hub's request log), the weight files
  it opens (a patched open counter: ``builtins.open``/``io.open``/``os.open``) and the bytes its read
  calls return (``rchar`` in /proc/self/io, which counts page-cache hits and sockets too);
- re-verification: sha256 (+ the git blob sha1 of small non-LFS files, as the cache step computes) of every
  cached file with one thread per core vs the single-core hashing speed times the cores, page cache warm
  (the files are read once first), so it measures hashing, not the disk.

The Hub runs in its own process (``hub_child.py``) so the client does not share its GIL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "bench-org/generated-llama"
SIZES = {
    # small: the default tiny model (about 1 MB), None = no target size
    "tiny": {"small": None, "large": 48 * 2**20, "shard": 16 * 2**20},
    "full": {"small": None, "large": 3 * 2**30, "shard": 500 * 10**6},
}


class Hub:
    """The loopback Hub process serving one generated model."""

    def __init__(self, model_dir: Path) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            [sys.executable, str(REPO / "bench" / "hub_child.py"), REPO_ID, str(model_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        self.url, self.commit = str(first["url"]), str(first["commit"])

    def log(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("log\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child(mode: str, hub: Hub, cache_dir: Path, files: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    began = time.perf_counter()
    out = subprocess.run(  # noqa: S603 - our own argv
        [sys.executable, str(REPO / "bench" / "cache_child.py"), mode, hub.url, REPO_ID, str(cache_dir), *files],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"},
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"cache_child {mode} failed ({out.returncode}): {out.stderr[-2000:]}")
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result["process_seconds"] = time.perf_counter() - began
    result["hub"] = hub.log()
    return result


def hash_rate_single_core(total: int = 512 * 2**20, block: int = 8 * 2**20) -> dict[str, float]:
    """Bytes per second of one core hashing in memory: sha256 alone, and sha256 + git sha1 (one pass)."""
    buf = os.urandom(block)
    rates = {}
    for label, names in (("sha256", ("sha256",)), ("sha256+sha1", ("sha256", "sha1"))):
        hashers = [hashlib.new(n) for n in names]
        began = time.perf_counter()
        for _ in range(total // block):
            for h in hashers:
                h.update(buf)
        rates[label] = total / (time.perf_counter() - began)
    return rates


def reverify(cache_dir: Path, commit: str) -> dict[str, Any]:
    """Re-hash every cached file of the commit with the runtime's own digest function, cores in parallel."""
    from vllm_runtime.cache.verify import file_digests

    folder = "models--" + REPO_ID.replace("/", "--")
    snapshot = cache_dir / "hub" / folder / "snapshots" / commit
    manifest = json.loads((cache_dir / "manifests" / folder / f"{commit}.json").read_text())
    paths = [(snapshot / f["path"]).resolve() for f in manifest["files"]]
    expected = {str((snapshot / f["path"]).resolve()): f["sha256"] for f in manifest["files"]}
    small = {str((snapshot / f["path"]).resolve()) for f in manifest["files"] if not f.get("lfs")}
    for p in paths:  # warm the page cache: this measures hashing, not the disk
        with p.open("rb") as fh:
            while fh.read(16 * 2**20):
                pass
    cores = os.cpu_count() or 1
    total = sum(p.stat().st_size for p in paths)
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cores) as pool:
        digests = list(pool.map(lambda p: (str(p), file_digests(p, git_oid=str(p) in small)[0]), paths))
    seconds = time.perf_counter() - began
    mismatches = sum(1 for p, sha in digests if expected[p] != sha)
    return {"bytes": total, "files": len(paths), "seconds": seconds, "rate": total / seconds,
            "threads": cores, "mismatches": mismatches}  # fmt: skip


def _generate(out: Path, target: int | None, shard: int) -> int:
    from vllm_runtime.devhub import tiny_model

    tiny_model.generate(out, target_bytes=target, shard_bytes=shard)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def run(size: str = "tiny", large_model_dir: Path | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """Warm checks of a small and a large model, and re-verification of the large one.

    ``large_model_dir``: an already generated model to use as the large one (the cold race's model);
    otherwise one of the size's ``large`` bytes is generated here. Generated models are deleted after.
    """
    cfg = SIZES[size]
    root = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=workdir))
    result: dict[str, Any] = {"size": size, "warm": {}}
    try:
        for label in ("large", "small"):
            model_dir = large_model_dir if (label == "large" and large_model_dir) else root / f"model-{label}"
            if not (model_dir / "config.json").exists():
                _generate(model_dir, cfg[label], cfg["shard"])
            model_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
            hub = Hub(model_dir)
            cache_dir = root / f"warm-{label}"
            try:
                cold = child("cache", hub, cache_dir)
                warm = child("warm", hub, cache_dir)
                warm["model_bytes"] = model_bytes
                warm["cold_seconds"] = cold["seconds"]
                result["warm"][label] = warm
                if label == "large":
                    result["reverify"] = reverify(cache_dir, hub.commit)
            finally:
                hub.stop()
                shutil.rmtree(cache_dir, ignore_errors=True)
        rates = hash_rate_single_core()
        cores = os.cpu_count() or 1
        rv = result["reverify"]
        rv.update({
            "single_core_sha256_rate": rates["sha256"],
            "single_core_sha256_sha1_rate": rates["sha256+sha1"],
            "cores": cores,
            "ceiling_rate": rates["sha256"] * cores,
            "ratio_to_ceiling": rv["rate"] / (rates["sha256"] * cores),
        })  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "tiny"), indent=1))
