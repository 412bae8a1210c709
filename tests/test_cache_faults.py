"""The cache under faults: Hub errors, stalls, corruption, kill -9, concurrent caches, a full volume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cache_helpers import cache_command, cache_in_process, cache_subprocess
from hub_fixtures import TINY_REPO

from vllm_runtime import summary
from vllm_runtime.cache import read_manifest
from vllm_runtime.cache.command import exit_code
from vllm_runtime.cache.progress import REGISTRY
from vllm_runtime.devhub.server import DevHub, Fault
from vllm_runtime.devhub.tiny_model import ModelShape, generate
from vllm_runtime.layout import CacheLayout, repo_folder_name

SHARDED_REPO = "test-org/sharded"


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def sharded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 11 MB of weights in ~3 MB safetensors shards (a real index), for crash and concurrency tests."""
    shape = ModelShape(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, head_dim=32)
    return generate(tmp_path_factory.mktemp("sharded"), shape=shape, shard_bytes=3_000_000)


def _shards(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


# ---- Hub errors -------------------------------------------------------------------------------------------


def test_5xx_on_a_file_is_retried(devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str],
                                  tmp_path: Path) -> None:
    devhub.inject(Fault("status", path="*/resolve/*model.safetensors", method="GET", status=503, times=2))
    retries_before = _metric("vllm_runtime_cache_retries_total")
    result = cache_in_process(tmp_path / "cache", tiny_repo[0])
    assert result.ok, result.message
    assert [r.status for r in devhub.content_gets("model.safetensors")] == [503, 503, 200]
    assert _metric("vllm_runtime_cache_retries_total") - retries_before >= 2


def test_hub_down_is_a_retryable_failure(devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str],
                                         tmp_path: Path) -> None:
    devhub.inject(Fault("status", path="/api/models/*", status=500, times=None))
    result = cache_in_process(tmp_path / "cache", tiny_repo[0], retries=2)
    assert not result.ok and result.reason == "HubUnavailable" and result.retryable
    assert exit_code(result) == summary.EXIT_RETRYABLE
    assert len([r for r in devhub.repo_requests() if r.path.startswith("/api/models/")]) == 3  # 1 + 2 retries


def test_429_waits_for_retry_after(devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str],
                                   tmp_path: Path) -> None:
    devhub.inject(Fault("rate_limit", path="/api/models/*", retry_after=0.1, times=1))
    devhub.inject(Fault("rate_limit", path="*/resolve/*model.safetensors", method="GET", retry_after=0, times=1))
    result = cache_in_process(tmp_path / "cache", tiny_repo[0])
    assert result.ok, result.message
    assert [r.status for r in devhub.content_gets("model.safetensors")] == [429, 200]
    assert [r.status for r in devhub.repo_requests() if "/revision/" in r.path] == [429, 200]

    devhub.clear_faults()
    devhub.inject(Fault("rate_limit", path="/api/models/*", retry_after=0.05, times=None))
    limited = cache_in_process(tmp_path / "other-cache", tiny_repo[0], retries=1)
    assert not limited.ok and limited.reason == "RateLimited" and limited.retryable


def test_stall_is_resumed_and_counted(devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str],
                                      tmp_path: Path) -> None:
    stall = devhub.inject(Fault("stall", path="*/resolve/*model.safetensors", method="GET", after_bytes=1000,
                                seconds=30, times=1))
    stalls_before = _metric("vllm_runtime_cache_stalls_total")
    result = cache_in_process(tmp_path / "cache", tiny_repo[0], stall_timeout=1.0)
    assert result.ok, result.message
    assert stall.hits == 1  # the stalled response is still hanging on the server: it is logged when it ends
    # the retry resumes after the 1000 bytes already written (bodies pass through unchunked, see run_cache)
    assert [(r.status, r.range) for r in devhub.content_gets("model.safetensors")] == [(206, "bytes=1000-")]
    assert _metric("vllm_runtime_cache_stalls_total") > stalls_before


def test_a_transfer_that_stays_stalled_fails_with_reason_stalled(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    devhub.inject(Fault("stall", path="*/resolve/*model.safetensors", method="GET", after_bytes=0,
                        seconds=30, times=None))
    result = cache_in_process(tmp_path / "cache", tiny_repo[0], stall_timeout=1.0, retries=0)
    assert not result.ok and result.reason == "Stalled" and result.retryable
    assert "--stall-timeout" in (result.message or "")
    assert read_manifest(tmp_path / "cache", *tiny_repo) is None


def test_truncated_body_is_resumed(devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path,
                                   hub_environ: dict[str, str], tmp_path: Path) -> None:
    devhub.inject(Fault("truncate", path="*/resolve/*model.safetensors", method="GET", after_bytes=4096, times=1))
    result = cache_in_process(tmp_path / "cache", tiny_repo[0])
    assert result.ok, result.message
    # Bodies pass through unchunked (run_cache), so the 4096 bytes were kept and only the rest is fetched.
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    gets = devhub.content_gets("model.safetensors")
    assert [(r.fault, r.range, r.bytes_sent) for r in gets] == [("truncate", None, 4096),
                                                                (None, "bytes=4096-", size - 4096)]


# ---- verification -----------------------------------------------------------------------------------------


def test_corrupted_file_is_caught_and_fetched_again(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path
) -> None:
    devhub.inject(Fault("corrupt", path="*/resolve/*model.safetensors", method="GET", after_bytes=5000, times=1))
    failures_before = _metric("vllm_runtime_cache_verification_failures_total")
    cache = tmp_path / "cache"
    result = cache_in_process(cache, tiny_repo[0])
    assert result.ok, result.message
    assert [r.fault for r in devhub.content_gets("model.safetensors")] == ["corrupt", None]
    assert _metric("vllm_runtime_cache_verification_failures_total") == failures_before + 1
    cached = CacheLayout(cache).snapshot_dir(*tiny_repo) / "model.safetensors"
    assert cached.read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_persistently_corrupt_file_fails_verification(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    devhub.inject(Fault("corrupt", path="*/resolve/*model.safetensors", method="GET", after_bytes=5000, times=None))
    cache = tmp_path / "cache"
    result = cache_in_process(cache, tiny_repo[0])
    assert not result.ok and result.reason == "VerificationFailed" and not result.retryable
    assert read_manifest(cache, *tiny_repo) is None
    # The corrupt blob is not left behind for vLLM to load.
    assert not (CacheLayout(cache).snapshot_dir(*tiny_repo) / "model.safetensors").exists()


# ---- crash safety and concurrency ---------------------------------------------------------------------------


def _journal(cache: Path, repo_id: str, commit: str) -> dict[str, object]:
    path = CacheLayout(cache).state / "verified" / f"{repo_folder_name(repo_id)}--{commit}.json"
    try:
        return dict(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError):
        return {}


@pytest.fixture
def throttled_sharded_repo(devhub: DevHub, sharded_model_dir: Path) -> Iterator[tuple[str, str]]:
    commit = devhub.add_repo(SHARDED_REPO, sharded_model_dir)
    devhub.throttle_bytes_per_second = 4_000_000
    yield SHARDED_REPO, commit
    devhub.throttle_bytes_per_second = None


def test_kill_9_mid_download_then_rerun_completes_without_refetching(
    devhub: DevHub, throttled_sharded_repo: tuple[str, str], sharded_model_dir: Path,
    hub_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo_id, commit = throttled_sharded_repo
    cache = tmp_path / "cache"
    port = _free_port()
    command = cache_command(cache, repo_id, "--max-workers", "1", "--metrics-port", str(port),
                            "--progress-interval", "0.2")
    process = subprocess.Popen(command, env=hub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.endswith(".safetensors") for p in _journal(cache, repo_id, commit)):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no shard was verified in time"
            time.sleep(0.05)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    total = sum(p.stat().st_size for p in sharded_model_dir.iterdir())
    samples = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line[:1].isalpha()}
    assert samples["vllm_runtime_cache_total_bytes"] == total  # every file of this repo is selected
    assert 0 < samples["vllm_runtime_cache_downloaded_bytes"] < total
    assert "vllm_runtime_cache_eta_seconds" in samples and samples["vllm_runtime_cache_complete"] == 0
    assert read_manifest(cache, repo_id, commit) is None  # killed: never reported complete
    verified = {p for p in _journal(cache, repo_id, commit) if p.endswith(".safetensors")}
    assert verified and len(verified) < len(_shards(sharded_model_dir))

    devhub.throttle_bytes_per_second = None
    assert devhub.wait_idle()  # the killed process's last requests are logged
    devhub.clear_log()
    for key in ("HF_ENDPOINT", "HF_HOME"):
        monkeypatch.setenv(key, hub_env[key])
    result = cache_in_process(cache, repo_id)
    assert result.ok, result.message
    for shard in verified:
        assert devhub.content_gets(shard) == [], f"{shard} was verified before the kill but fetched again"
    assert 0 < result.extra["downloadedBytes"] < total
    manifest = read_manifest(cache, repo_id, commit)
    assert manifest is not None
    assert {f["path"] for f in manifest["files"]} >= set(_shards(sharded_model_dir))
    assert not list((CacheLayout(cache).repo_dir(repo_id) / "blobs").glob("*.incomplete"))


def test_two_caches_at_once_download_once(
    devhub: DevHub, throttled_sharded_repo: tuple[str, str], sharded_model_dir: Path,
    hub_env: dict[str, str], tmp_path: Path,
) -> None:
    repo_id, commit = throttled_sharded_repo
    cache = tmp_path / "cache"
    commands = [cache_command(cache, repo_id, "--termination-message-path", str(tmp_path / f"t{i}"))
                for i in range(2)]
    processes = [subprocess.Popen(c, env=hub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    results = [summary.parse_termination_message((tmp_path / f"t{i}").read_text()) for i in range(2)]
    assert all(r is not None and r["commit"] == commit for r in results)
    assert sorted(bool(r["reused"]) for r in results if r) == [False, True]  # one downloaded, one reused
    for shard in _shards(sharded_model_dir):
        assert len(devhub.content_gets(shard)) == 1, shard
    assert read_manifest(cache, repo_id, commit) is not None


# ---- space --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real 512 KiB tmpfs when this process may mount one (root); otherwise a stand-in.

    The stand-in patches ``shutil.disk_usage`` as the cache command sees it to report 512 KiB free: it
    exercises the same needed-vs-free check, but not the filesystem itself.
    """
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = False
    if shutil.which("mount") and hasattr(os, "geteuid") and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(volume)],
                                 capture_output=True).returncode == 0
    if not mounted:
        real = shutil.disk_usage

        def tiny_disk(path: str | os.PathLike[str]) -> object:
            usage = real(path)
            return type(usage)(total=512 * 1024, used=0, free=512 * 1024)

        monkeypatch.setattr("vllm_runtime.cache.command.shutil.disk_usage", tiny_disk)
    try:
        yield volume
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(volume)], capture_output=True)


def test_not_enough_space_fails_before_downloading(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], small_volume: Path
) -> None:
    result = cache_in_process(small_volume / "cache", tiny_repo[0])
    assert not result.ok and result.reason == "InsufficientSpace" and not result.retryable
    assert "spec.cache.size" in (result.message or "")
    assert devhub.content_gets() == []
    assert not any(r.method == "HEAD" for r in devhub.repo_requests())


def test_cli_exit_codes_distinguish_permanent_and_retryable(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_env: dict[str, str], tmp_path: Path
) -> None:
    devhub.inject(Fault("status", path="/api/models/*", status=502, times=None))
    run = cache_subprocess(tmp_path / "cache", TINY_REPO, hub_env, "--retries", "1")
    assert run.returncode == summary.EXIT_RETRYABLE
    assert run.termination is not None and run.termination["reason"] == "HubUnavailable"
    assert run.termination["retryable"] is True


def test_corrupted_small_file_is_caught_by_its_git_oid(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    devhub.inject(Fault("corrupt", path="*/resolve/*/config.json", method="GET", after_bytes=10, times=1))
    result = cache_in_process(tmp_path / "cache", tiny_repo[0])
    assert result.ok, result.message
    assert [r.fault for r in devhub.content_gets("config.json")] == ["corrupt", None]


def test_watchdog_counts_stalls_and_aborts_a_hang_no_timeout_sees(tmp_path: Path) -> None:
    from vllm_runtime.cache.progress import ProgressMonitor

    aborted: list[float] = []
    stalls_before = _metric("vllm_runtime_cache_stalls_total")
    monitor = ProgressMonitor(tmp_path, {"a" * 64: 100}, stall_timeout=0.1, log_interval=60,
                              in_flight=lambda: 1, abort_after=0.4, on_abort=aborted.append).start()
    deadline = time.monotonic() + 10
    while not aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    monitor.stop()
    assert aborted and aborted[0] >= 0.4
    assert _metric("vllm_runtime_cache_stalls_total") == stalls_before + 1  # one quiet period, one stall

    # Sleeping between retries (nothing in flight) is not a stall.
    idle = ProgressMonitor(tmp_path, {"a" * 64: 100}, stall_timeout=0.1, log_interval=60,
                           in_flight=lambda: 0, abort_after=0.2, on_abort=aborted.append).start()
    time.sleep(0.6)
    idle.stop()
    assert len(aborted) == 1


def test_kill_9_at_many_moments_never_leaves_a_false_manifest(
    devhub: DevHub, throttled_sharded_repo: tuple[str, str], hub_env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm_runtime.cache.verify import file_digests

    repo_id, commit = throttled_sharded_repo
    cache = tmp_path / "cache"
    snapshot = CacheLayout(cache).snapshot_dir(repo_id, commit)
    for delay in (0.3, 0.6, 0.9, 1.2, 1.6, 2.0):  # from start-up through metadata, shards and the manifest
        process = subprocess.Popen(cache_command(cache, repo_id), env=hub_env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        manifest = read_manifest(cache, repo_id, commit)
        if manifest is not None:  # complete means complete: every file there, with its sha256
            for entry in manifest["files"]:
                assert file_digests(snapshot / entry["path"], git_oid=False)[0] == entry["sha256"]
    devhub.throttle_bytes_per_second = None
    for key in ("HF_ENDPOINT", "HF_HOME"):
        monkeypatch.setenv(key, hub_env[key])
    assert cache_in_process(cache, repo_id).ok
