"""``vllm-runtime ls``, ``rm`` and ``gc`` on a cache filled from the loopback Hub."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
from cache_helpers import cache_in_process
from hub_fixtures import TINY_REPO

from vllm_runtime import manage, summary
from vllm_runtime.cache import find_complete_commit, read_manifest
from vllm_runtime.cache.manifest import snapshot_matches
from vllm_runtime.cache.usage import lease_if_complete
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.devhub.tiny_model import generate
from vllm_runtime.layout import CacheLayout, repo_folder_name

OTHER_REPO = "test-org/other"


@pytest.fixture
def filled_cache(
    devhub: DevHub, tiny_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path
) -> tuple[Path, dict[str, str]]:
    """Three complete commits: tiny@v1, tiny@v2 (only config.json differs: shared blobs), other@main."""
    v1 = devhub.add_repo(TINY_REPO, tiny_model_dir)
    devhub.create_tag(TINY_REPO, "v1", v1)
    changed = tmp_path / "v2"
    shutil.copytree(tiny_model_dir, changed)
    (changed / "config.json").write_text((tiny_model_dir / "config.json").read_text().replace("1e-05", "2e-05"))
    v2 = devhub.add_commit(TINY_REPO, changed)
    other = devhub.add_repo(OTHER_REPO, changed)
    cache = tmp_path / "cache"
    for model, revision in ((TINY_REPO, "v1"), (TINY_REPO, "main"), (OTHER_REPO, "main")):
        assert cache_in_process(cache, model, revision).ok
    return cache, {"v1": v1, "v2": v2, "other": other}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    manage.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def _set_last_used(cache: Path, repo_id: str, commit: str, when: float) -> None:
    path = CacheLayout(cache).state / "last-used" / f"{repo_folder_name(repo_id)}--{commit}"
    os.utime(path, (when, when))


def test_ls_lists_commits_sizes_and_state(
    filled_cache: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cache, commits = filled_cache
    code, out, _ = _cli(capsys, "ls", "--cache-dir", str(cache), "--json")
    assert code == 0
    listed = {(e["repo_id"], e["commit"]): e for e in json.loads(out)}
    assert set(listed) == {(TINY_REPO, commits["v1"]), (TINY_REPO, commits["v2"]), (OTHER_REPO, commits["other"])}
    v1 = listed[(TINY_REPO, commits["v1"])]
    assert v1["complete"] and v1["revisions"] == ["v1"] and v1["files"] == 6 and v1["last_used"]
    assert v1["bytes"] == read_manifest(cache, TINY_REPO, commits["v1"])["bytes"]  # type: ignore[index]

    # A snapshot without a manifest (a killed run) shows as incomplete.
    partial = CacheLayout(cache).snapshot_dir("test-org/partial", "a" * 40)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    code, out, _ = _cli(capsys, "ls", "--cache-dir", str(cache))
    assert code == 0
    line = next(line for line in out.splitlines() if "test-org/partial" in line)
    assert "incomplete" in line
    assert "total on volume" in out


def test_rm_keeps_shared_blobs_and_refuses_commits_in_use(
    filled_cache: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cache, commits = filled_cache
    size_before = manage.cache_size(cache)
    code, out, _ = _cli(capsys, "rm", "--cache-dir", str(cache), "--model", TINY_REPO, "--revision", commits["v1"])
    assert code == 0 and "removed" in out
    assert read_manifest(cache, TINY_REPO, commits["v1"]) is None
    assert not CacheLayout(cache).snapshot_dir(TINY_REPO, commits["v1"]).exists()
    assert find_complete_commit(cache, TINY_REPO, "v1") is None
    # v2 shares every blob but config.json: it is still complete and intact.
    v2 = read_manifest(cache, TINY_REPO, commits["v2"])
    assert v2 is not None and snapshot_matches(cache, v2)
    freed = size_before - manage.cache_size(cache)
    assert 0 < freed < 10_000  # only v1's config.json blob

    manage.mark_in_use(cache, OTHER_REPO, commits["other"], holder="pod-a")
    code, _, err = _cli(capsys, "rm", "--cache-dir", str(cache), "--model", OTHER_REPO)
    assert code == summary.EXIT_PERMANENT and "pod-a" in err
    assert read_manifest(cache, OTHER_REPO, commits["other"]) is not None
    code, _, _ = _cli(capsys, "rm", "--cache-dir", str(cache), "--model", OTHER_REPO, "--force")
    assert code == 0
    assert not CacheLayout(cache).repo_dir(OTHER_REPO).exists()

    code, _, err = _cli(capsys, "rm", "--cache-dir", str(cache), "--model", "test-org/never-cached")
    assert code == summary.EXIT_PERMANENT and "not in the cache" in err


def test_gc_evicts_least_recently_used_commits_not_in_use(
    filled_cache: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cache, commits = filled_cache
    now = time.time()
    _set_last_used(cache, TINY_REPO, commits["v1"], now - 3000)  # oldest, but in use below
    _set_last_used(cache, OTHER_REPO, commits["other"], now - 2000)
    _set_last_used(cache, TINY_REPO, commits["v2"], now - 1000)
    manage.mark_in_use(cache, TINY_REPO, commits["v1"], holder="pod-b")
    _set_last_used(cache, TINY_REPO, commits["v1"], now - 3000)  # mark_in_use touched it; keep it the oldest
    lease = next((CacheLayout(cache).state / "leases").glob("*.lease"))

    code, out, _ = _cli(capsys, "gc", "--cache-dir", str(cache), "--max-size", "1", "--dry-run")
    assert "would evict" in out and read_manifest(cache, OTHER_REPO, commits["other"]) is not None

    # Bound: just under the total. "other" (least recently used, not in use) goes first and is enough.
    bound = manage.cache_size(cache) - 10
    code, out, _ = _cli(capsys, "gc", "--cache-dir", str(cache), "--max-size", str(bound))
    assert code == 0
    assert read_manifest(cache, OTHER_REPO, commits["other"]) is None
    assert read_manifest(cache, TINY_REPO, commits["v1"]) is not None
    assert read_manifest(cache, TINY_REPO, commits["v2"]) is not None

    # Nothing fits in 1 byte while v1 is leased: gc evicts v2 and reports the bound is still exceeded.
    code, out, err = _cli(capsys, "gc", "--cache-dir", str(cache), "--max-size", "1")
    assert code == summary.EXIT_RETRYABLE and "in use" in err
    assert read_manifest(cache, TINY_REPO, commits["v2"]) is None
    assert read_manifest(cache, TINY_REPO, commits["v1"]) is not None

    # A stale lease (not renewed within the TTL) no longer protects the commit.
    os.utime(lease, (now - 7200, now - 7200))
    code, _, _ = _cli(capsys, "gc", "--cache-dir", str(cache), "--max-size", "0")
    assert code == 0 and manage.cache_size(cache) == 0
    assert read_manifest(cache, TINY_REPO, commits["v1"]) is None


def test_parse_size() -> None:
    assert manage.parse_size("10Gi") == 10 * 1024**3
    assert manage.parse_size("500MB") == 500 * 1000**2
    assert manage.parse_size("1.5Gi") == 3 * 512 * 1024**2
    assert manage.parse_size("123") == 123
    for typo in ("ten gigs", "5i", "1iB", "0.5", "1.5", "1.0000001K", "-1", "Gi"):
        with pytest.raises(argparse.ArgumentTypeError):
            manage.parse_size(typo)


@pytest.mark.parametrize(
    "argv",
    [
        ("gc", "--max-size", "5i"), ("gc", "--max-size", "1iB"), ("gc", "--max-size", "0.5"),
        ("gc", "--max-size", "1Gi", "--lease-ttl", "0"), ("gc", "--max-size", "1Gi", "--lease-ttl", "-5"),
        ("gc", "--max-size", "1Gi", "--lease-ttl", "nan"), ("ls", "--lease-ttl", "inf"),
        ("rm", "--model", "o/m", "--lease-ttl", "0"),
    ],
)
def test_bad_sizes_and_lease_ttls_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _cli(capsys, argv[0], "--cache-dir", str(tmp_path), *argv[1:])
    assert exited.value.code == summary.EXIT_USAGE
    err = capsys.readouterr().err
    assert ("--lease-ttl" if "--lease-ttl" in argv else "--max-size") in err


def test_rm_checks_leases_under_the_commits_lock(
    filled_cache: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that leases the commit right after rm listed the cache still wins: the check runs under the lock."""
    cache, commits = filled_cache
    real_list = manage.list_cache

    def list_then_a_server_leases(*args: object, **kwargs: object) -> list[manage.CachedCommit]:
        listed = real_list(*args, **kwargs)  # type: ignore[arg-type]
        assert lease_if_complete(cache, OTHER_REPO, commits["other"], holder="late-pod")
        return listed

    monkeypatch.setattr(manage, "list_cache", list_then_a_server_leases)
    with pytest.raises(PermissionError, match="late-pod"):
        manage.remove(cache, OTHER_REPO, commits["other"])
    assert read_manifest(cache, OTHER_REPO, commits["other"]) is not None


def test_a_server_cannot_lease_a_commit_rm_removed(filled_cache: tuple[Path, dict[str, str]]) -> None:
    cache, commits = filled_cache
    manage.remove(cache, OTHER_REPO, commits["other"])
    assert lease_if_complete(cache, OTHER_REPO, commits["other"], holder="pod") is False
    assert not list((CacheLayout(cache).state / "leases").glob("*.lease"))
    # While rm holds the lock, the lease waits for it rather than slipping in.
    lock = filelock.FileLock(str(CacheLayout(cache).lock_path(TINY_REPO, commits["v1"])))
    with lock, pytest.raises(filelock.Timeout):
        lease_if_complete(cache, TINY_REPO, commits["v1"], holder="pod", lock_timeout=0.2)


def _age(path: Path, seconds: float = 2 * manage.LEFTOVER_MIN_AGE_SECONDS) -> Path:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)
    return path


def test_gc_removes_what_failed_caches_left_and_nothing_live(
    filled_cache: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cache, commits = filled_cache
    layout = CacheLayout(cache)
    complete_before = {(c.repo_id, c.commit) for c in manage.list_cache(cache) if c.complete}
    # A killed cache of test-org/killed: snapshot without manifest, a blob only it uses, its verification
    # journal, a temporary manifest.
    killed = "test-org/killed"
    blobs = layout.repo_dir(killed) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "aaaa").write_bytes(b"x" * 1000)
    snapshot = layout.snapshot_dir(killed, "b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blobs / "aaaa")
    # In a repo that keeps a complete commit: a partial download and a blob no snapshot links to.
    other_blobs = layout.repo_dir(OTHER_REPO) / "blobs"
    partial = other_blobs / "cccc.incomplete"
    partial.write_bytes(b"y" * 500)
    _age(partial)
    journal = layout.state / "verified" / f"{repo_folder_name(killed)}--{'b' * 40}.json"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text("{}")
    orphan = other_blobs / "dddd"
    orphan.write_bytes(b"z" * 10)
    _age(orphan)
    tmp_manifest = layout.manifests / repo_folder_name(TINY_REPO) / ".x.json.123.tmp"
    tmp_manifest.write_text("{")
    _age(tmp_manifest)
    # Live work that must stay: a partial download too young to be a leftover, and a cache run that holds
    # its commit's lock (a snapshot without manifest yet).
    fresh_partial = layout.repo_dir(TINY_REPO) / "blobs" / "eeee.incomplete"
    fresh_partial.write_bytes(b"live")
    live = layout.snapshot_dir("test-org/running", "c" * 40)
    live.mkdir(parents=True)
    (live / "config.json").write_text("{}")
    running_lock = layout.lock_path("test-org/running", "c" * 40)
    running_lock.parent.mkdir(parents=True, exist_ok=True)

    with filelock.FileLock(str(running_lock)):
        code, out, _ = _cli(capsys, "gc", "--cache-dir", str(cache), "--max-size", "1Gi", "--dry-run")
        assert code == 0 and "would remove incomplete snapshot" in out and snapshot.exists()
        code, out, _ = _cli(capsys, "gc", "--cache-dir", str(cache), "--max-size", "1Gi")
    assert code == 0, out
    assert not snapshot.exists() and not (blobs / "aaaa").exists() and not journal.exists()
    assert not partial.exists() and not orphan.exists() and not tmp_manifest.exists()
    assert "partial download" in out and "temporary file" in out
    assert fresh_partial.exists() and live.exists()
    assert {(c.repo_id, c.commit) for c in manage.list_cache(cache) if c.complete} == complete_before
    for repo_id, commit in complete_before:
        manifest = read_manifest(cache, repo_id, commit)
        assert manifest is not None and snapshot_matches(cache, manifest)


# ------------------------------------------------------------------ a revision change never fills the volume

MODEL_BYTES_APPROX = 760_000  # the default tiny model: weights, tokenizer and configs


@pytest.fixture
def volume_for_two_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A volume that holds two tiny models but not three: a real tmpfs when this process may mount one
    (root); otherwise ``shutil.disk_usage`` as the cache sees it reports the quota minus the bytes under it."""
    volume = tmp_path / "volume"
    volume.mkdir()
    quota = int(2.5 * MODEL_BYTES_APPROX)
    mounted = shutil.which("mount") is not None and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={quota // 1024}k", "tmpfs", str(volume)], capture_output=True
    ).returncode == 0
    if not mounted:
        real = shutil.disk_usage

        def quota_disk(path: str | os.PathLike[str]) -> object:
            used = sum(p.stat().st_size for p in volume.rglob("*") if p.is_file() and not p.is_symlink())
            return type(real(path))(total=quota, used=used, free=max(quota - used, 0))

        monkeypatch.setattr("vllm_runtime.cache.command.shutil.disk_usage", quota_disk)
    try:
        yield volume
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(volume)], capture_output=True)


def test_revision_changes_evict_unserved_commits_least_recently_used_first(
    devhub: DevHub, hub_environ: dict[str, str], tmp_path: Path, volume_for_two_models: Path
) -> None:
    models = [generate(tmp_path / f"model-{seed}", seed=seed) for seed in range(4)]
    main = devhub.add_repo(TINY_REPO, models[0])
    tags = {}
    for n, model in enumerate(models[1:], start=1):
        tags[f"v{n}"] = devhub.add_commit(TINY_REPO, model, branch=f"b{n}")
        devhub.create_tag(TINY_REPO, f"v{n}", tags[f"v{n}"])
    cache = volume_for_two_models / "cache"

    assert cache_in_process(cache, TINY_REPO, "main").ok
    v1 = cache_in_process(cache, TINY_REPO, "v1")
    assert v1.ok, v1.message
    manage.mark_in_use(cache, TINY_REPO, tags["v1"], holder="server-on-v1")  # v1 is served
    v2 = cache_in_process(cache, TINY_REPO, "v2")  # the third revision: main (unserved, oldest) makes room
    assert v2.ok, v2.message
    assert read_manifest(cache, TINY_REPO, main) is None
    for tag in ("v1", "v2"):
        manifest = read_manifest(cache, TINY_REPO, tags[tag])
        assert manifest is not None and snapshot_matches(cache, manifest)

    # Both cached commits served: nothing may go, so the next revision fails, and it says why.
    manage.mark_in_use(cache, TINY_REPO, tags["v2"], holder="server-on-v2")
    v3 = cache_in_process(cache, TINY_REPO, "v3")
    assert not v3.ok and v3.reason == "InsufficientSpace" and v3.retryable is False
    for tag in ("v1", "v2"):
        manifest = read_manifest(cache, TINY_REPO, tags[tag])
        assert manifest is not None and snapshot_matches(cache, manifest)
