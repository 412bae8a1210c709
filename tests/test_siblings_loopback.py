"""Sibling seeding end to end on loopback, with real processes: the loopback Hub (``vllm_runtime.devhub``,
throttled to a set rate, in this test process so its request log can be read), ``vllm-runtime sibling``
serving a verified cache in its own process, and ``vllm-runtime cache --sibling`` runs as subprocesses.

Faults: the sibling killed mid-file, a sibling serving a corrupted byte (bit rot on its volume after it
was verified), a sibling serving files of another commit under this commit's name. Each run must end
verified against the Hub's sha256, with the fallback in its summary, and keep nothing unverified.
Every wait is on a condition with a deadline."""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cache_helpers import cache_command, cache_in_process

from vllm_runtime import summary
from vllm_runtime.cache import read_manifest
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.devhub.tiny_model import ModelShape, generate
from vllm_runtime.layout import CacheLayout

REPO = "test-org/seeded"
HUB_RATE = 4_000_000  # bytes per second, all transfers together
SHAPE = ModelShape(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=32)


@pytest.fixture(scope="session")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 11 MB of weights in four ~3 MB safetensors shards."""
    return generate(tmp_path_factory.mktemp("seeded-a"), shape=SHAPE, shard_bytes=3_000_000, seed=1)


@pytest.fixture(scope="session")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape with other weights: same file names and sizes, other bytes (another commit)."""
    return generate(tmp_path_factory.mktemp("seeded-b"), shape=SHAPE, shard_bytes=3_000_000, seed=2)


@pytest.fixture
def hub(devhub: DevHub, model_a: Path) -> DevHub:
    devhub.add_repo(REPO, model_a)
    devhub.rate_limit_bytes_per_second = HUB_RATE
    return devhub


def commit_of(hub: DevHub) -> str:
    return hub.repos[REPO].branches["main"]


@pytest.fixture
def seed(tmp_path: Path, hub: DevHub, hub_environ: dict[str, str]) -> Path:
    """A volume with the commit cached and verified from the (throttled) Hub: the serving replica's."""
    cache = tmp_path / "replica-0"
    result = cache_in_process(cache, REPO)
    assert result.ok and result.extra["hubBytes"] == result.bytes, result
    return cache


class SiblingProcess:
    def __init__(self, cache: Path, env: dict[str, str], *extra: str):
        command = [sys.executable, "-m", "vllm_runtime.cli", "sibling", "--cache-dir", str(cache),
                   "--host", "127.0.0.1", "--port", "0", "--model", REPO, *extra]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise AssertionError("vllm-runtime sibling did not report its address")
                if sel.select(timeout=0.5):
                    line += os.read(self.proc.stdout.fileno(), 4096)
        self.url = str(json.loads(line)["url"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def sibling_process(cache: Path, env: dict[str, str], *extra: str) -> Iterator[SiblingProcess]:
    process = SiblingProcess(cache, env, *extra)
    try:
        yield process
    finally:
        process.stop()


def start_cache(cache: Path, env: dict[str, str], *siblings: str) -> tuple[subprocess.Popen[bytes], Path]:
    command = cache_command(cache, REPO, *[a for url in siblings for a in ("--sibling", url)],
                            "--sibling-timeout", "5")
    termination = Path(command[command.index("--termination-message-path") + 1])
    termination.unlink(missing_ok=True)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), termination


def finish_cache(proc: subprocess.Popen[bytes], termination: Path, timeout: float = 300) -> dict[str, Any]:
    _, stderr = proc.communicate(timeout=timeout)
    result = summary.parse_termination_message(termination.read_text() if termination.exists() else None)
    assert proc.returncode == 0 and result and result["ok"], (proc.returncode, result, stderr.decode()[-3000:])
    return result


def run_cache(cache: Path, env: dict[str, str], *siblings: str) -> dict[str, Any]:
    return finish_cache(*start_cache(cache, env, *siblings))


def assert_verified_copy(cache: Path, hub: DevHub, commit: str) -> None:
    """The volume holds exactly the commit's selected files, each with the Hub's digest; nothing else kept."""
    manifest = read_manifest(cache, REPO, commit)
    assert manifest is not None and manifest["verified"]
    published = hub.repos[REPO].commits[commit].files
    snapshot = CacheLayout(cache).snapshot_dir(REPO, commit)
    blobs = CacheLayout(cache).repo_dir(REPO) / "blobs"
    expected_blobs = set()
    for entry in manifest["files"]:
        data = (snapshot / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == published[entry["path"]].sha256 == entry["sha256"]
        expected_blobs.add(os.path.basename(os.path.realpath(snapshot / entry["path"])))
    assert {p.name for p in blobs.iterdir()} == expected_blobs, "an unverified or partial blob was kept"
    assert {p.name for p in snapshot.iterdir()} == {e["path"] for e in manifest["files"]}


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_three_new_replicas_fill_from_one_sibling_with_metadata_only_from_the_hub(
    seed: Path, hub: DevHub, hub_env: dict[str, str], tmp_path: Path,
) -> None:
    commit = commit_of(hub)
    one_copy = read_manifest(seed, REPO, commit)["bytes"]  # type: ignore[index]
    assert sum(r.bytes_sent for r in hub.content_gets()) == one_copy  # the seed replica took one copy
    hub.clear_log()
    with sibling_process(seed, hub_env) as sibling:
        runs = [start_cache(tmp_path / f"replica-{i}", hub_env, sibling.url) for i in (1, 2, 3)]
        results = [finish_cache(*run) for run in runs]
    for i, result in enumerate(results, start=1):
        assert result["commit"] == commit and result["verified"]
        assert result["siblingBytes"] == result["bytes"] == one_copy and result["hubBytes"] == 0, result
        assert result["siblingFallbacks"] == 0
        assert_verified_copy(tmp_path / f"replica-{i}", hub, commit)
    requests = hub.repo_requests()
    assert hub.content_gets() == []  # not one byte of a file from the Hub
    assert {r.path for r in requests} == {f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}/tree/{commit}"}
    metadata = sum(r.bytes_sent for r in requests)
    assert metadata < 20_000 < one_copy  # listing and revision only


def test_sibling_killed_mid_file_the_file_comes_from_the_hub(
    seed: Path, hub: DevHub, hub_env: dict[str, str], tmp_path: Path,
) -> None:
    commit = commit_of(hub)
    target = tmp_path / "replica-1"
    blobs = CacheLayout(target).repo_dir(REPO) / "blobs"
    with sibling_process(seed, hub_env, "--rate-limit", "500000") as sibling:
        proc, termination = start_cache(target, hub_env, sibling.url)
        deadline = time.monotonic() + 120
        while True:  # wait until a weight shard is partly transferred from the sibling
            partial = [p for p in blobs.glob("*.sibling-*.incomplete") if p.stat().st_size >= 300_000] \
                if blobs.is_dir() else []
            if partial:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no sibling transfer seen in progress: {finish_cache(proc, termination)}")
            time.sleep(0.05)
        sibling.kill()
        result = finish_cache(proc, termination)
    assert result["siblingFallbacks"] >= 1 and result["hubBytes"] > 0, json.dumps(result)
    assert result["hubBytes"] + result["siblingBytes"] == result["bytes"]
    assert any("dropped" in e or "ended" in e or "unreachable" in e for e in result["siblingErrors"]), result
    assert_verified_copy(target, hub, commit)


def test_sibling_serving_a_corrupted_byte_the_file_comes_from_the_hub(
    seed: Path, hub: DevHub, hub_env: dict[str, str], tmp_path: Path,
) -> None:
    commit = commit_of(hub)
    shard = sorted(f for f in hub.repos[REPO].commits[commit].files if f.endswith(".safetensors"))[1]
    flip_byte((CacheLayout(seed).snapshot_dir(REPO, commit) / shard).resolve(), 2_000_000)  # bit rot after verify
    hub.clear_log()
    target = tmp_path / "replica-1"
    with sibling_process(seed, hub_env) as sibling:
        result = run_cache(target, hub_env, sibling.url)
    size = hub.repos[REPO].commits[commit].files[shard].size
    assert result["hubBytes"] >= size and result["hubBytes"] + result["siblingBytes"] == result["bytes"], result
    assert any(e.startswith(f"{shard}: ") and "sha256" in e for e in result["siblingErrors"]), result
    assert [r.path.rsplit("/", 1)[-1] for r in hub.content_gets()].count(shard) == 1
    assert_verified_copy(target, hub, commit)


def test_a_corrupt_sibling_is_left_for_a_good_one(
    seed: Path, hub: DevHub, hub_env: dict[str, str], tmp_path: Path,
) -> None:
    """Every file of the first sibling is rotten: the first file tried there fails, the rest come from the second;
    no file content from the Hub."""
    commit = commit_of(hub)
    rotten = tmp_path / "rotten"
    shutil.copytree(seed, rotten, symlinks=True)
    for blob in (CacheLayout(rotten).repo_dir(REPO) / "blobs").iterdir():
        flip_byte(blob, blob.stat().st_size // 2)
    hub.clear_log()
    target = tmp_path / "replica-1"
    with sibling_process(rotten, hub_env) as bad, sibling_process(seed, hub_env) as good:
        result = run_cache(target, hub_env, bad.url, good.url)
    assert result["siblingBytes"] == result["bytes"] and result["hubBytes"] == 0, result
    assert result["siblingFallbacks"] >= 1 and all(bad.url in e for e in result["siblingErrors"]), result
    assert hub.content_gets() == []
    assert_verified_copy(target, hub, commit)


def test_sibling_serving_files_of_another_commit(
    hub: DevHub, model_b: Path, hub_env: dict[str, str], hub_environ: dict[str, str], tmp_path: Path,
) -> None:
    """The sibling's volume holds commit B's files filed under commit A (mislabelled): same names and sizes,
    other bytes. The Hub's sha256 for A catches every such file; they come from the Hub."""
    commit_a = commit_of(hub)
    commit_b = hub.add_commit(REPO, model_b, branch="b")
    liar = tmp_path / "liar"
    assert cache_in_process(liar, REPO, revision=commit_b).ok
    layout = CacheLayout(liar)
    layout.snapshot_dir(REPO, commit_b).rename(layout.snapshot_dir(REPO, commit_a))
    manifest = json.loads(layout.manifest_path(REPO, commit_b).read_text())
    layout.manifest_path(REPO, commit_b).unlink()
    layout.manifest_path(REPO, commit_a).write_text(json.dumps({**manifest, "commit": commit_a}))
    differing = {p for p, f in hub.repos[REPO].commits[commit_a].files.items()
                 if f.sha256 != hub.repos[REPO].commits[commit_b].files[p].sha256}
    assert any(p.endswith(".safetensors") for p in differing)
    hub.clear_log()
    target = tmp_path / "replica-1"
    with sibling_process(liar, hub_env) as sibling:
        result = run_cache(target, hub_env, sibling.url)
    assert result["commit"] == commit_a and result["siblingFallbacks"] >= 1, result
    assert result["hubBytes"] > 0 and result["hubBytes"] + result["siblingBytes"] == result["bytes"]
    fetched_from_hub = {r.path.rsplit("/", 1)[-1] for r in hub.content_gets()}
    assert fetched_from_hub and fetched_from_hub <= set(hub.repos[REPO].commits[commit_a].files)
    assert_verified_copy(target, hub, commit_a)


def test_no_sibling_reachable_everything_from_the_hub(
    hub: DevHub, hub_environ: dict[str, str], tmp_path: Path,
) -> None:
    result = cache_in_process(tmp_path / "replica-1", REPO, siblings=["http://127.0.0.1:9"], sibling_timeout=2)
    assert result.ok and result.extra["hubBytes"] == result.bytes and result.extra["siblingBytes"] == 0
    assert result.extra["siblingFallbacks"] >= 1 and "unreachable" in result.extra["siblingErrors"][0]
    assert_verified_copy(tmp_path / "replica-1", hub, commit_of(hub))
