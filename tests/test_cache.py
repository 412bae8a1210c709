"""``vllm-runtime cache`` against the loopback Hub: pinning, verification, reuse, errors.

Fault, crash and concurrency cases are in ``test_cache_faults.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cache_helpers import cache_in_process, cache_subprocess, manifest_path
from hub_fixtures import TINY_REPO
from prometheus_client import generate_latest

from vllm_runtime import summary
from vllm_runtime.cache import find_complete_commit, read_manifest
from vllm_runtime.cache.progress import REGISTRY
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.layout import CacheLayout

EXPECTED_FILES = {
    "config.json", "generation_config.json", "model.safetensors",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cold_download_pins_verifies_and_reports(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_env: dict[str, str], tmp_path: Path
) -> None:
    repo_id, commit = tiny_repo
    cache = tmp_path / "cache"
    run = cache_subprocess(cache, repo_id, hub_env)
    assert run.returncode == summary.EXIT_OK, run.stderr
    assert run.termination is not None
    assert run.termination["ok"] is True
    assert run.termination["commit"] == commit
    assert run.termination["verified"] is True
    assert run.termination["files"] == len(EXPECTED_FILES)
    # The summary is also the last stdout line (for FallbackToLogsOnError).
    assert json.loads(run.stdout.strip().splitlines()[-1])["commit"] == commit

    manifest = read_manifest(cache, repo_id, commit)
    assert manifest is not None
    assert {f["path"] for f in manifest["files"]} == EXPECTED_FILES
    for entry in manifest["files"]:
        assert entry["sha256"] == _sha256(tiny_model_dir / entry["path"])
        assert entry["size"] == (tiny_model_dir / entry["path"]).stat().st_size
    assert manifest["bytes"] == run.termination["bytes"] == sum(f["size"] for f in manifest["files"])
    assert manifest["revisions"] == ["main"]
    # huggingface_hub's layout under <cache>/hub, readable offline by vLLM (HF_HUB_CACHE=<cache>/hub).
    snapshot = CacheLayout(cache).snapshot_dir(repo_id, commit)
    assert {p.name for p in snapshot.iterdir()} == EXPECTED_FILES
    assert (CacheLayout(cache).repo_dir(repo_id) / "refs" / "main").read_text() == commit
    assert "progress:" in run.stderr  # a progress line with bytes, rate and ETA
    assert find_complete_commit(cache, repo_id, "main") == commit


def test_warm_reuse_makes_no_content_requests(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    repo_id, commit = tiny_repo
    cache = tmp_path / "cache"
    assert cache_in_process(cache, repo_id).ok
    manifest_before = manifest_path(cache, repo_id, commit).read_text()

    devhub.clear_log()
    warm = cache_in_process(cache, repo_id, "main")
    assert warm.ok and warm.extra["reused"] is True and warm.commit == commit
    assert devhub.content_gets() == []
    # A branch is resolved once (one revision call) and nothing else: no tree listing, no HEADs.
    assert [(r.method, r.path) for r in devhub.repo_requests()] == [
        ("GET", f"/api/models/{repo_id}/revision/main")
    ]

    devhub.clear_log()
    pinned = cache_in_process(cache, repo_id, commit)
    assert pinned.ok and pinned.extra["reused"] is True
    assert devhub.log_snapshot() == []  # a commit needs no network at all
    assert manifest_path(cache, repo_id, commit).read_text() == manifest_before


def test_new_files_are_on_the_disk_before_the_manifest_vouches_for_them(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # A warm start checks only the manifest: written before the weights were flushed, a power loss could
    # leave a node that restarts "warm" on truncated files.
    repo_id, commit = tiny_repo
    cache = tmp_path / "cache"
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert cache_in_process(cache, repo_id).ok
    manifest = manifest_path(cache, repo_id, commit).resolve()
    manifest_fsync = next(i for i, path in enumerate(synced) if path.name.startswith(f".{manifest.name}."))
    before = set(synced[:manifest_fsync])
    snapshot = CacheLayout(cache).snapshot_dir(repo_id, commit).resolve()
    blobs = {link.resolve() for link in snapshot.iterdir()}
    assert len(blobs) == len(EXPECTED_FILES)
    assert blobs <= before, f"not flushed before the manifest: {sorted(p.name for p in blobs - before)}"
    assert {snapshot, snapshot.parent, next(iter(blobs)).parent} <= before  # the names, not only the bytes
    assert read_manifest(cache, repo_id, commit)["syncSeconds"] >= 0  # type: ignore[index]


def test_branch_tag_and_commit_resolve_to_their_commits(
    devhub: DevHub, tiny_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path
) -> None:
    first = devhub.add_repo(TINY_REPO, tiny_model_dir)
    second_dir = tmp_path / "second"
    shutil.copytree(tiny_model_dir, second_dir)
    config = json.loads((second_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (second_dir / "config.json").write_text(json.dumps(config))
    second = devhub.add_commit(TINY_REPO, second_dir)
    devhub.create_tag(TINY_REPO, "v1.0", first)
    devhub.create_branch(TINY_REPO, "stable", first)
    cache = tmp_path / "cache"

    assert cache_in_process(cache, TINY_REPO, "main").commit == second
    by_tag = cache_in_process(cache, TINY_REPO, "v1.0")
    assert by_tag.commit == first and by_tag.extra["reused"] is False
    by_branch = cache_in_process(cache, TINY_REPO, "stable")
    assert by_branch.commit == first and by_branch.extra["reused"] is True
    devhub.clear_log()
    assert cache_in_process(cache, TINY_REPO, first).extra["reused"] is True
    assert devhub.log_snapshot() == []

    # Blobs are shared: the second commit only added a new config.json blob.
    assert read_manifest(cache, TINY_REPO, first)["revisions"] == ["stable", "v1.0"]  # type: ignore[index]
    assert find_complete_commit(cache, TINY_REPO, "v1.0") == first
    assert find_complete_commit(cache, TINY_REPO, "main") == second
    assert find_complete_commit(cache, TINY_REPO, "nope") is None
    snap = CacheLayout(cache).snapshot_dir
    assert (snap(TINY_REPO, first) / "config.json").read_bytes() != (snap(TINY_REPO, second) / "config.json").read_bytes()


CANARY = "hf_CANARYtoken0123456789abcdefXYZ"


def test_gated_repo_needs_the_token_and_the_token_never_leaks(
    devhub: DevHub, tiny_model_dir: Path, hub_env: dict[str, str], tmp_path: Path
) -> None:
    commit = devhub.add_repo("test-org/gated", tiny_model_dir, gated=True, token=CANARY)
    cache = tmp_path / "cache"

    no_token = cache_subprocess(cache, "test-org/gated", hub_env)
    assert no_token.returncode == summary.EXIT_PERMANENT
    assert no_token.termination is not None and no_token.termination["reason"] == "GatedRepo"
    assert "hfTokenSecretRef" in no_token.termination["message"]
    assert read_manifest(cache, "test-org/gated", commit) is None

    wrong = cache_subprocess(cache, "test-org/gated", hub_env | {"HF_TOKEN": CANARY[::-1]})
    assert wrong.returncode == summary.EXIT_PERMANENT
    assert wrong.termination is not None and wrong.termination["reason"] == "GatedRepo"
    assert CANARY[::-1] not in wrong.stdout + wrong.stderr + json.dumps(wrong.termination)

    ok = cache_subprocess(cache, "test-org/gated", hub_env | {"HF_TOKEN": CANARY}, "--log-level", "DEBUG")
    assert ok.returncode == summary.EXIT_OK, ok.stderr
    assert ok.termination is not None and ok.termination["commit"] == commit
    assert any(r.authorized for r in devhub.content_gets())
    # The canary appears nowhere: logs (DEBUG), stdout, termination message, any file on the volume.
    assert CANARY not in ok.stdout + ok.stderr
    assert CANARY not in json.dumps(ok.termination)
    for path in cache.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def test_token_absent_from_metrics_and_in_process_logs(
    devhub: DevHub, tiny_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    devhub.add_repo("test-org/gated", tiny_model_dir, gated=True, token=CANARY)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    caplog.set_level("DEBUG")
    result = cache_in_process(tmp_path / "cache", "test-org/gated")
    assert result.ok
    assert CANARY not in generate_latest(REGISTRY).decode()
    assert CANARY not in caplog.text
    assert CANARY not in result.to_json()


def test_unknown_repo_and_revision_are_permanent_failures(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_env: dict[str, str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    missing = cache_subprocess(cache, "test-org/does-not-exist", hub_env)
    assert missing.returncode == summary.EXIT_PERMANENT
    assert missing.termination is not None and missing.termination["reason"] == "RepoNotFound"
    assert "spec.model" in missing.termination["message"]

    bad_rev = cache_subprocess(cache, tiny_repo[0], hub_env, revision="no-such-branch")
    assert bad_rev.returncode == summary.EXIT_PERMANENT
    assert bad_rev.termination is not None and bad_rev.termination["reason"] == "RevisionNotFound"
    assert "spec.revision" in bad_rev.termination["message"]
    assert bad_rev.termination["retryable"] is False
    assert devhub.content_gets() == []


def test_repo_with_bin_and_safetensors_caches_only_safetensors(
    devhub: DevHub, tiny_model_with_bin_dir: Path, hub_environ: dict[str, str], tmp_path: Path
) -> None:
    commit = devhub.add_repo("test-org/both", tiny_model_with_bin_dir)
    result = cache_in_process(tmp_path / "cache", "test-org/both")
    assert result.ok and result.extra["weightFormat"] == "safetensors"
    manifest = read_manifest(tmp_path / "cache", "test-org/both", commit)
    assert manifest is not None
    assert "pytorch_model.bin" not in {f["path"] for f in manifest["files"]}
    assert devhub.content_gets("pytorch_model.bin") == []
    assert len(devhub.content_gets("model.safetensors")) == 1

    # Without safetensors the .bin is the weight format.
    bin_only = tmp_path / "bin-only"
    shutil.copytree(tiny_model_with_bin_dir, bin_only)
    (bin_only / "model.safetensors").unlink()
    bin_commit = devhub.add_repo("test-org/bin-only", bin_only)
    result = cache_in_process(tmp_path / "cache", "test-org/bin-only")
    assert result.ok and result.extra["weightFormat"] == "pytorch"
    bin_manifest = read_manifest(tmp_path / "cache", "test-org/bin-only", bin_commit)
    assert bin_manifest is not None and "pytorch_model.bin" in {f["path"] for f in bin_manifest["files"]}


def test_include_and_exclude_patterns(
    devhub: DevHub, tiny_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path
) -> None:
    repo_dir = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, repo_dir)
    (repo_dir / "README.md").write_text("# tiny\n")
    (repo_dir / "original").mkdir()
    (repo_dir / "original" / "params.json").write_text("{}")
    commit = devhub.add_repo("test-org/patterns", repo_dir)
    cache = tmp_path / "cache"
    result = cache_in_process(
        cache, "test-org/patterns", include=["original/*"], exclude=["generation_config.json"]
    )
    assert result.ok
    manifest = read_manifest(cache, "test-org/patterns", commit)
    assert manifest is not None
    paths = {f["path"] for f in manifest["files"]}
    assert "original/params.json" in paths
    assert "generation_config.json" not in paths and "README.md" not in paths


def test_local_directory_is_validated_not_downloaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = cache_in_process(cache, str(tiny_model_dir), endpoint="http://127.0.0.1:9")
    assert result.ok and result.extra["source"] == "local" and result.verified is False
    assert result.bytes == sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert not CacheLayout(cache).manifests.exists()  # the source may be read-only: nothing is written

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    failed = cache_in_process(cache, str(no_weights), endpoint="http://127.0.0.1:9")
    assert not failed.ok and failed.reason == "NoWeights"

    missing = cache_in_process(cache, "pvc://models/llama", endpoint="http://127.0.0.1:9")
    assert not missing.ok and missing.reason == "InvalidModel" and "/models/models/llama" in (missing.message or "")


def test_vllm_runtime_cli_runs_cache_and_ls(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vllm_runtime import cli

    cache = tmp_path / "cache"
    termination = tmp_path / "termination-log"
    code = cli.main(["cache", "--model", tiny_repo[0], "--cache-dir", str(cache),
                     "--termination-message-path", str(termination)])
    assert code == summary.EXIT_OK
    message = summary.parse_termination_message(termination.read_text())
    assert message is not None and message["commit"] == tiny_repo[1]
    capsys.readouterr()
    assert cli.main(["ls", "--cache-dir", str(cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["commit"] == tiny_repo[1]


def test_cache_follows_lfs_redirects_like_the_real_hub(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our cache against a Hub that sends LFS files to a CDN (as huggingface.co does): the token stays with
    the Hub, the CDN's bytes are verified (a corrupt body is caught and fetched again), the requests are
    counted, and a warm run fetches nothing."""
    from hub_fixtures import hub_environment

    from vllm_runtime.devhub.server import Fault

    with DevHub(redirect_lfs=True) as hub:
        commit = hub.add_repo(TINY_REPO, tiny_model_dir, gated=True, token="hf_redirect_test")
        home = tmp_path / "home"
        home.mkdir()
        for key, value in hub_environment(hub, home).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("HF_TOKEN", "hf_redirect_test")
        hub.inject(Fault("corrupt", path="/cdn-lfs/*", after_bytes=100))  # the first CDN answer flips one byte
        cache = tmp_path / "cache"
        cold = cache_in_process(cache, TINY_REPO)
        assert cold.ok and cold.commit == commit
        hub.wait_idle()
        log = hub.log_snapshot()

        # Hub: one revision lookup, one tree listing, one HEAD per file (twice for the refetched LFS file)
        lfs = {"model.safetensors"}
        files = {p.name for p in tiny_model_dir.iterdir() if p.is_file()}
        heads = [r.path.rsplit("/", 1)[-1] for r in log if r.method == "HEAD"]
        assert sorted(heads) == sorted([*files, *lfs])
        assert [r.status for r in log if r.method == "HEAD" and r.path.endswith("model.safetensors")] == [302, 302]
        assert sum("/revision/" in r.path for r in log) == 1 and sum("/tree/" in r.path for r in log) == 1
        # content: small files from the Hub, the LFS file only from the CDN, twice (corrupt, then good)
        cdn = [r for r in log if r.path.startswith("/cdn-lfs/")]
        assert [(r.method, r.fault) for r in cdn] == [("GET", "corrupt"), ("GET", None)]
        hub_gets = {r.path.rsplit("/", 1)[-1] for r in log if r.method == "GET" and "/resolve/" in r.path}
        assert hub_gets == files - lfs
        # the token went to the Hub on every request and never to the CDN
        assert all(r.authorized for r in log if not r.path.startswith("/cdn-lfs/"))
        assert not any(r.authorized for r in cdn)

        # what is cached is the source, byte for byte, and the manifest holds the sha256 the Hub publishes
        snapshot = CacheLayout(cache).snapshot_dir(TINY_REPO, commit)
        source = (tiny_model_dir / "model.safetensors").read_bytes()
        assert (snapshot / "model.safetensors").read_bytes() == source
        manifest = read_manifest(cache, TINY_REPO, commit)
        assert manifest is not None
        by_path = {f["path"]: f for f in manifest["files"]}
        assert by_path["model.safetensors"]["sha256"] == hashlib.sha256(source).hexdigest()

        hub.clear_log()
        assert cache_in_process(cache, TINY_REPO).extra["reused"] is True
        assert hub.content_gets() == []


def test_damaged_cache_is_repaired(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path
) -> None:
    repo_id, commit = tiny_repo
    cache = tmp_path / "cache"
    assert cache_in_process(cache, repo_id).ok
    snapshot = CacheLayout(cache).snapshot_dir(repo_id, commit)

    # A snapshot link deleted: the warm check (sizes) notices; the blob is still there, re-verified, relinked.
    (snapshot / "tokenizer.json").unlink()
    assert find_complete_commit(cache, repo_id, "main") is None
    devhub.clear_log()
    relinked = cache_in_process(cache, repo_id)
    assert relinked.ok and relinked.extra["reused"] is False and relinked.extra["downloadedBytes"] == 0
    assert devhub.content_gets() == []
    # The file itself deleted: only that file is fetched again.
    tokenizer = snapshot / "tokenizer.json"
    tokenizer.resolve().unlink()
    tokenizer.unlink()
    devhub.clear_log()
    repaired = cache_in_process(cache, repo_id)
    assert repaired.ok and repaired.extra["reused"] is False
    assert {r.path.rsplit("/", 1)[-1] for r in devhub.content_gets()} == {"tokenizer.json"}

    # Bytes changed in place (same size): only --verify-existing re-hashes and catches it.
    weights = snapshot / "model.safetensors"
    blob = weights.resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    devhub.clear_log()
    assert cache_in_process(cache, repo_id).extra["reused"] is True  # size-only warm check
    assert devhub.content_gets() == []
    checked = cache_in_process(cache, repo_id, verify_existing=True)
    assert checked.ok and checked.extra["reused"] is False
    assert len(devhub.content_gets("model.safetensors")) == 1
    assert weights.read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
