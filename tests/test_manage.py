"""``vllm-runtime ls``, ``rm`` and ``gc`` on a cache filled from the loopback Hub."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cache_helpers import cache_in_process
from hub_fixtures import TINY_REPO

from vllm_runtime import manage, summary
from vllm_runtime.cache import find_complete_commit, read_manifest
from vllm_runtime.cache.manifest import snapshot_matches
from vllm_runtime.devhub.server import DevHub
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
    assert manage.parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        manage.parse_size("ten gigs")
