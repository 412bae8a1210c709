"""Scale-out 1 -> 4 replicas: seeding new caches from a sibling vs every replica downloading from the Hub.

Generates a model of ``--size`` (default 2 GiB, safetensors shards) and serves it from the loopback Hub
(``vllm_runtime.devhub``, in this process) with every file transfer together capped at ``--hub-rate``
(default 100 MB/s: a Hub, mirror or egress link that all replicas share). Each replica is a fresh
``vllm-runtime cache`` subprocess with its own cache directory (its own volume). Then:

1. **hub-only**: four replicas fill their caches from the Hub at once (what every replica downloading the
   model means); time until all four are verified, and the bytes the Hub sent (file contents vs metadata).
2. **seeded**: replica 0 fills from the Hub, then serves its verified cache with ``vllm-runtime sibling``
   (the same server ``serve --sibling-port`` runs); replicas 1-3 fill at once with ``--sibling`` (bytes from the
   sibling, file list and sha256 from the Hub). Time until all four are verified (replica 0's download, the
   sibling's start and the three fills), and the Hub's bytes.
3. **transfer rate**: one cache filling alone from the sibling (download + sha256 of every byte + rename),
   against ``cp`` of the same blob files on the same disk, and against ``cp`` followed by ``openssl dgst -sha256``
   of the copies (the least a verified copy costs); each measured ``--rounds`` times, alternating which goes
   first; the source blobs are in the page cache for all. Two readings of each: into the page cache (the
   fill's download time; ``cp`` alone), and onto the disk (the fill's download plus its fsync of the new files
   before the manifest, ``syncSeconds``; ``cp`` then ``sync`` of the copies and their folder). Dirty pages are
   flushed (``sync``, untimed) before each measurement so none is charged for another's writeback.

The Hub's file bytes are read from its own request log (every byte it sent, per request), not from the
clients. Nothing is a fixed sleep: each step waits for its processes.

    python bench/scaleout_bench.py [--size 2GiB] [--hub-rate 100MB] [--rounds 2] [--workdir /tmp/scaleout-bench]
                                   [--out bench/scaleout_results.json] [--keep]

Needs about 7 x --size free on the work directory's disk (checked first); everything is deleted at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import facts, versions  # noqa: E402
from vllm_runtime.devhub.server import DevHub  # noqa: E402
from vllm_runtime.devhub.tiny_model import generate, parse_size  # noqa: E402

REPO = "bench-org/scaleout"


def _env(hub: DevHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE",
                                                            "VLLM_RUNTIME_SIBLINGS")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1")
    return env


def _start_cache(cache: Path, env: dict[str, str], siblings: list[str]) -> tuple[subprocess.Popen[str], Path]:
    term = cache.parent / f"{cache.name}.termination.json"
    term.unlink(missing_ok=True)
    command = [sys.executable, "-m", "vllm_runtime.cli", "cache", "--model", REPO, "--revision", "main",
               "--cache-dir", str(cache), "--termination-message-path", str(term),
               *[a for url in siblings for a in ("--sibling", url)]]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), term


def _finish(proc: subprocess.Popen[str], term: Path) -> dict[str, Any]:
    _, err = proc.communicate()
    if proc.returncode != 0 or not term.exists():
        raise SystemExit(f"vllm-runtime cache failed ({proc.returncode}):\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(term.read_text())
    if not (result.get("ok") and result.get("verified")):
        raise SystemExit(f"cache not verified: {result}")
    return result


def _fill(caches: list[Path], env: dict[str, str], siblings: list[str]) -> tuple[float, list[dict[str, Any]]]:
    began = time.monotonic()
    runs = [_start_cache(c, env, siblings) for c in caches]
    results = [_finish(*run) for run in runs]
    return time.monotonic() - began, results


def _hub_bytes(hub: DevHub) -> dict[str, int]:
    log = hub.repo_requests()
    content = sum(r.bytes_sent for r in log if r.is_file_content)
    return {"file_bytes": content, "metadata_bytes": sum(r.bytes_sent for r in log) - content,
            "file_requests": sum(1 for r in log if r.is_file_content), "requests": len(log)}


class _Sibling:
    def __init__(self, cache: Path, env: dict[str, str]):
        self.began = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_runtime.cli", "sibling", "--cache-dir", str(cache), "--host", "127.0.0.1",
             "--port", "0", "--model", REPO], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                if self.proc.poll() is not None:
                    raise SystemExit("vllm-runtime sibling exited before it listened")
                if sel.select(timeout=1.0):
                    line += os.read(self.proc.stdout.fileno(), 4096)
        self.url = str(json.loads(line)["url"])
        self.start_seconds = time.monotonic() - self.began

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def _blob_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir())


def _on_disk(dest: Path, began: float) -> float:
    """``sync`` the copies and their folder (fsync of each, as the fill does); seconds since ``began``."""
    subprocess.run(["sync", *map(str, sorted(dest.iterdir())), str(dest)], check=True)
    return time.monotonic() - began


def _raw_copy(files: list[Path], dest: Path) -> tuple[float, float]:
    """Seconds until ``cp`` returns (page cache), and until the copies are on the disk."""
    dest.mkdir(parents=True)
    began = time.monotonic()
    subprocess.run(["cp", *map(str, files), str(dest)], check=True)
    return time.monotonic() - began, _on_disk(dest, began)


def _verified_copy(files: list[Path], dest: Path) -> tuple[float, float]:
    """cp, then sha256 of the copies (openssl): the least a copy checked against known digests costs."""
    dest.mkdir(parents=True)
    began = time.monotonic()
    subprocess.run(["cp", *map(str, files), str(dest)], check=True)
    # openssl uses the CPU's SHA extensions like hashlib does; coreutils' sha256sum does not
    hasher = ["openssl", "dgst", "-sha256"] if shutil.which("openssl") else ["sha256sum"]
    subprocess.run([*hasher, *map(str, sorted(dest.iterdir()))], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - began, _on_disk(dest, began)


def _drop(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=parse_size("2GiB"))
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("500MB"))
    parser.add_argument("--hub-rate", type=parse_size, default=parse_size("100MB"), help="bytes per second, shared")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the transfer-rate comparison")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "scaleout-bench")
    parser.add_argument("--volumes", type=Path,
                        help="where the replicas' caches go (default: <workdir>/runs). On one disk the fills share its "
                             "write rate, as separate volumes would not; a tmpfs (/dev/shm/...) stands in for volumes "
                             "on separate disks (its fsync returns at once)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and caches")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    load_at_start = round(os.getloadavg()[0], 2)
    free = shutil.disk_usage(args.workdir).free
    if free < 7 * args.size + (2 << 30):
        raise SystemExit(f"{free / 1e9:.1f} GB free on {args.workdir}; this run needs about {7 * args.size / 1e9:.1f} GB")
    model_dir = args.workdir / "model"
    try:
        if not (model_dir / "config.json").exists():
            print(f"generating a {args.size / 2**30:.2f} GiB model in {model_dir} ...", flush=True)
            generate(model_dir, target_bytes=args.size, shard_bytes=args.shard_size)
        out = _run(args, model_dir)
    finally:
        if not args.keep:
            _drop(args.workdir, *([args.volumes] if args.volumes else []))
    out["load_average_1m_at_start"] = load_at_start
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    runs = args.volumes or args.workdir / "runs"
    with DevHub() as hub:
        commit = hub.add_repo(REPO, model_dir)  # hashes every file once: the page cache holds them for the Hub
        hub.rate_limit_bytes_per_second = int(args.hub_rate)
        env = _env(hub, args.workdir / "hf-home")
        print(f"serving {REPO}@{commit} on {hub.url}, all file transfers together capped at "
              f"{args.hub_rate / 1e6:.0f} MB/s", flush=True)

        # 1. every replica from the Hub
        _drop(runs)
        hub.clear_log()
        hub_only_seconds, hub_only = _fill([runs / f"hub-only-{i}" for i in range(4)], env, [])
        hub_only_bytes = _hub_bytes(hub)
        model_bytes = int(hub_only[0]["bytes"])
        print(f"hub-only: 4 caches verified in {hub_only_seconds:.1f} s; Hub sent {hub_only_bytes}", flush=True)
        _drop(runs)

        # 2. replica 0 from the Hub, replicas 1-3 from it
        hub.clear_log()
        began = time.monotonic()
        first_seconds, (first,) = _fill([runs / "seeded-0"], env, [])
        sibling = _Sibling(runs / "seeded-0", env)
        try:
            seed_seconds, seeded = _fill([runs / f"seeded-{i}" for i in (1, 2, 3)], env, [sibling.url])
            seeded_seconds = time.monotonic() - began
            seeded_bytes = _hub_bytes(hub)
            print(f"seeded: replica 0 in {first_seconds:.1f} s, replicas 1-3 from it in {seed_seconds:.1f} s; "
                  f"all four in {seeded_seconds:.1f} s; Hub sent {seeded_bytes}", flush=True)
            for result in seeded:
                if result["hubBytes"] != 0 or result["siblingBytes"] != model_bytes:
                    raise SystemExit(f"a seeded replica took file bytes from the Hub: {result}")
            _drop(*(runs / f"seeded-{i}" for i in (1, 2, 3)))

            # 3. one fill from the sibling alone vs cp of the same files, alternating
            blobs = _blob_files(runs / "seeded-0")
            rates: list[dict[str, Any]] = []
            for round_no in range(args.rounds):
                order = ("sibling", "cp", "cp+sha256") if round_no % 2 == 0 else ("cp+sha256", "cp", "sibling")
                row: dict[str, Any] = {"round": round_no, "first": order[0]}
                for what in order:
                    os.sync()  # the last step's writeback is not charged to this one
                    if what == "sibling":
                        wall, (alone,) = _fill([runs / "alone"], env, [sibling.url])
                        manifest = json.loads((runs / "alone" / "manifests" / f"models--{REPO.replace('/', '--')}"
                                               / f"{commit}.json").read_text())
                        row["sibling"] = {
                            "wall_seconds": round(wall, 3), "download_seconds": manifest["downloadSeconds"],
                            "MBps_download": round(model_bytes / manifest["downloadSeconds"] / 1e6, 1),
                            "MBps_wall": round(model_bytes / wall / 1e6, 1), "hubBytes": alone["hubBytes"],
                            "sync_seconds": manifest["syncSeconds"],
                            "MBps_on_disk": round(
                                model_bytes / (manifest["downloadSeconds"] + manifest["syncSeconds"]) / 1e6, 1),
                        }
                        _drop(runs / "alone")
                    else:
                        copy = _raw_copy if what == "cp" else _verified_copy
                        seconds, on_disk = copy(blobs, runs / "cp")
                        row[what] = {"seconds": round(seconds, 3), "MBps": round(model_bytes / seconds / 1e6, 1),
                                     "seconds_on_disk": round(on_disk, 3),
                                     "MBps_on_disk": round(model_bytes / on_disk / 1e6, 1)}
                        _drop(runs / "cp")
                row["ratio_download_vs_cp"] = round(row["sibling"]["MBps_download"] / row["cp"]["MBps"], 2)
                row["ratio_wall_vs_cp"] = round(row["sibling"]["MBps_wall"] / row["cp"]["MBps"], 2)
                row["ratio_download_vs_cp_sha256"] = round(
                    row["sibling"]["MBps_download"] / row["cp+sha256"]["MBps"], 2)
                row["ratio_on_disk_vs_cp_on_disk"] = round(
                    row["sibling"]["MBps_on_disk"] / row["cp"]["MBps_on_disk"], 2)
                print(f"transfer round {round_no}: {row}", flush=True)
                rates.append(row)
        finally:
            sibling.stop()

    return {
        "bench": "scaleout",
        "machine": facts(args.workdir),
        "volumes": {"path": str(runs), "filesystem": facts(runs)["Disk (benchmark files)"]},
        "versions": versions(),
        "model": {"repo": REPO, "commit": commit, "bytes": model_bytes, "files": hub_only[0]["files"]},
        "hub_rate_bytes_per_second": int(args.hub_rate),
        "hub_only": {"seconds": round(hub_only_seconds, 2), "hub": hub_only_bytes,
                     "copies_from_hub": round(hub_only_bytes["file_bytes"] / model_bytes, 3)},
        "seeded": {
            "seconds": round(seeded_seconds, 2), "replica0_seconds": round(first_seconds, 2),
            "sibling_start_seconds": round(sibling.start_seconds, 2), "replicas_1_3_seconds": round(seed_seconds, 2),
            "hub": seeded_bytes, "copies_from_hub": round(seeded_bytes["file_bytes"] / model_bytes, 3),
            "replicas": [{k: r[k] for k in ("hubBytes", "siblingBytes", "siblingFallbacks", "durationSeconds")}
                         for r in [first, *seeded]],
        },
        "speedup_all_four_verified": round(hub_only_seconds / seeded_seconds, 2),
        # What hub-only would take if the Hub always delivered its cap (here it may deliver less, CPU-starved):
        "hub_only_at_cap_seconds": round(4 * model_bytes / args.hub_rate, 2),
        "speedup_vs_hub_only_at_cap": round(4 * model_bytes / args.hub_rate / seeded_seconds, 2),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "transfer_rate": rates,
    }


if __name__ == "__main__":
    raise SystemExit(main())
