"""The cache's failures say what really happened: one error class per reason, permanent unless retrying helps.

Each case runs the real cache command (in process, or as a subprocess for the exit code) against the
loopback Hub or a real unusable directory; nothing is mocked except where a test says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cache_helpers import cache_in_process, cache_subprocess
from hub_fixtures import TINY_REPO

from vllm_runtime import summary
from vllm_runtime.cache import errors
from vllm_runtime.cache.command import CacheOptions, _note_revision
from vllm_runtime.devhub.server import DevHub, Fault
from vllm_runtime.layout import CacheLayout, is_valid_repo_id, is_valid_revision, parse_model

API_REVISION = "/api/models/*/revision/*"


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ------------------------------------------------------------------ the hierarchy


def test_every_error_class_is_a_reason_of_the_right_kind() -> None:
    assert len({cls.reason for cls in errors.ERROR_CLASSES}) == len(errors.ERROR_CLASSES)  # one class per reason
    for cls in errors.ERROR_CLASSES:
        error = cls("why")
        expected = summary.REASONS_RETRYABLE if cls.retryable else summary.REASONS_PERMANENT
        assert cls.reason in expected, cls
        assert error.exit_code == (summary.EXIT_RETRYABLE if cls.retryable else summary.EXIT_PERMANENT)
    assert {c.reason for c in errors.ERROR_CLASSES if c.retryable} == {
        "HubUnavailable", "RateLimited", "Stalled", "NetworkError", "CacheBusy",
    }


def test_an_unknown_exception_is_a_permanent_internal_error_with_its_type_and_message() -> None:
    class Surprise(Exception):
        pass

    failure = errors.classify(Surprise("the frobnicator broke"), repo_id="o/m", revision="main", has_token=False)
    assert type(failure) is errors.InternalError and not failure.retryable
    assert failure.exit_code == summary.EXIT_PERMANENT
    assert "Surprise" in failure.message and "the frobnicator broke" in failure.message
    assert "retrying" not in failure.message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(30, "Read-only file system", "/cache/hub"), errors.ReadOnlyVolume),
        (PermissionError(13, "Permission denied", "/cache/hub"), errors.ReadOnlyVolume),
        (NotADirectoryError(20, "Not a directory", "/cache/hub"), errors.CacheDirInvalid),
        (FileExistsError(17, "File exists", "/cache"), errors.CacheDirInvalid),
        (OSError(28, "No space left on device"), errors.InsufficientSpace),
        (OSError("Consistency check failed: file should be of size 10 but has size 5"), errors.NetworkError),
        (json.JSONDecodeError("Expecting value", "<html>", 0), errors.InvalidHubResponse),
        (KeyError("sha"), errors.InternalError),
    ],
)
def test_classify_uses_types_and_errno(error: BaseException, expected: type[errors.CacheError]) -> None:
    assert type(errors.classify(error, repo_id="o/m", revision="main", has_token=False)) is expected


# ------------------------------------------------------------------ the volume


def test_a_cache_dir_that_is_a_file_is_permanent(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_env: dict[str, str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    run = cache_subprocess(cache, tiny_repo[0], hub_env)
    assert run.returncode == summary.EXIT_PERMANENT, run.stderr
    assert run.termination is not None and run.termination["reason"] == "CacheDirInvalid"
    assert run.termination["retryable"] is False and "--cache-dir must be a directory" in run.termination["message"]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A real read-only tmpfs where this process may mount one (root); else a /sys path, which even root cannot
    write (chmod would not stop root)."""
    volume = tmp_path / "ro"
    volume.mkdir()
    mounted = shutil.which("mount") is not None and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(volume)], capture_output=True
    ).returncode == 0
    try:
        yield volume if mounted else Path("/sys/vllm-runtime-test-cache")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(volume)], capture_output=True)


def test_a_read_only_volume_is_permanent_and_says_so(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], read_only_dir: Path
) -> None:
    result = cache_in_process(read_only_dir / "cache", tiny_repo[0])
    assert not result.ok and result.reason == "ReadOnlyVolume" and result.retryable is False
    assert "read-write" in (result.message or "") or "writable" in (result.message or "")
    assert devhub.content_gets() == []


# ------------------------------------------------------------------ what the Hub answers


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<!doctype html><html><body>Please log in to the proxy</body></html>", "text/html"),
        (b'{"id": "test-org/tiny-llama", "sha": "0123', "application/json"),  # truncated JSON
    ],
    ids=["html", "truncated-json"],
)
def test_a_hub_answering_something_else_is_permanent(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_env: dict[str, str], tmp_path: Path,
    body: bytes, content_type: str,
) -> None:
    devhub.inject(Fault("body", path=API_REVISION, times=None, body=body, content_type=content_type))
    run = cache_subprocess(tmp_path / "cache", tiny_repo[0], hub_env)
    assert run.returncode == summary.EXIT_PERMANENT, run.stderr
    assert run.termination is not None and run.termination["reason"] == "InvalidHubResponse"
    assert "HF_ENDPOINT" in run.termination["message"]
    assert devhub.content_gets() == []


def test_a_commit_that_is_not_40_hex_is_refused(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path
) -> None:
    answer = json.dumps({"id": TINY_REPO, "modelId": TINY_REPO, "sha": "release", "siblings": []}).encode()
    devhub.inject(Fault("body", path=API_REVISION, times=None, body=answer))
    result = cache_in_process(tmp_path / "cache", TINY_REPO, "release")
    assert not result.ok and result.reason == "InvalidHubResponse" and result.retryable is False
    assert "'release'" in (result.message or "") and "40-hex" in (result.message or "")
    assert result.commit is None
    assert devhub.content_gets() == []
    assert not (tmp_path / "cache" / "manifests").exists()


@pytest.mark.parametrize("model", ["a--b/c", "org/name-", "org/" + "n" * 97, "org/.hidden", "org/name.git"])
def test_an_invalid_model_id_is_permanent_before_any_request(
    devhub: DevHub, hub_environ: dict[str, str], tmp_path: Path, model: str
) -> None:
    result = cache_in_process(tmp_path / "cache", model)
    assert not result.ok and result.reason == "InvalidModel" and result.retryable is False
    assert "spec.model" in (result.message or "")
    assert devhub.repo_requests() == []


# ------------------------------------------------------------------ revisions


@pytest.mark.parametrize(
    "revision", ["main/../../x", "../../../../tmp/x", "..", ".hidden", "a//b", "/abs", "v1.lock", "a b", "a~1", "@",
                 "x@{1}", "trailing.", "trailing/"],
)
def test_a_revision_that_is_no_ref_name_is_refused_and_writes_nothing_outside(
    devhub: DevHub, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path, revision: str
) -> None:
    # A lenient Hub (or mirror) that resolves the name anyway: the refusal must be ours.
    devhub.create_branch(TINY_REPO, revision, tiny_repo[1])
    before = _files_under(tmp_path)
    result = cache_in_process(tmp_path / "work" / "cache", TINY_REPO, revision)
    assert not result.ok and result.reason == "InvalidRevision" and result.retryable is False
    assert "spec.revision" in (result.message or "")
    assert devhub.repo_requests() == []
    assert _files_under(tmp_path) - before <= {tmp_path / "work"} | set((tmp_path / "work").rglob("*"))
    assert not (tmp_path / "work" / "cache" / "manifests").exists()


def test_recording_a_revision_never_writes_outside_the_refs_folder(tmp_path: Path) -> None:
    cache = tmp_path / "a" / "b" / "cache"
    before = _files_under(tmp_path)
    commit = "0" * 40
    opts = CacheOptions(model=TINY_REPO, cache_dir=cache, revision="main/../../../../../../x")
    _note_revision(opts, TINY_REPO, {"commit": commit, "revisions": []})
    assert _files_under(tmp_path) == before
    good = CacheOptions(model=TINY_REPO, cache_dir=cache, revision="refs/pr/1")
    _note_revision(good, TINY_REPO, {"commit": commit, "revisions": []})
    assert (CacheLayout(cache).repo_dir(TINY_REPO) / "refs" / "refs" / "pr" / "1").read_text() == commit


REF_NAMES = [
    "main", "v1.0", "refs/pr/1", "feature/x-y_z", "a" * 40, "A" * 40, "main/../x", "..", ".x", "x/.y", "x.lock",
    "x/y.lock/z", "a b", "a\tb", "a~b", "a^b", "a:b", "a?b", "a*b", "a[b", "a\\b", "@", "a@{b", "a@b", "/a", "a/",
    "a//b", "a.", "", "-dash", "ü", "a/b.", "a..b", "x\x7f",
]


@pytest.mark.parametrize("name", REF_NAMES)
def test_revision_rules_match_git_check_ref_format(name: str) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    accepted_by_git = subprocess.run(
        [git, "check-ref-format", "--allow-onelevel", name], capture_output=True
    ).returncode == 0
    if name.startswith("-"):  # git reads it as an option; a leading dash is a valid ref name otherwise
        accepted_by_git = subprocess.run(
            [git, "check-ref-format", "--allow-onelevel", f"refs/{name}"], capture_output=True
        ).returncode == 0
    assert is_valid_revision(name) is accepted_by_git


def test_repo_ids_follow_huggingface_hubs_rules() -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    for repo_id in ["Qwen/Qwen2.5-0.5B-Instruct", "a--b/c", "org/name-", "org/" + "n" * 96, "org/" + "n" * 97,
                    "org/x.git", "-org/x", "org/_x", "org/x_", "o.o/x", "org/a..b", "org/é"]:
        try:
            validate_repo_id(repo_id)
            hub_accepts = True
        except HFValidationError:
            hub_accepts = False
        assert is_valid_repo_id(repo_id) is hub_accepts, repo_id


@pytest.mark.parametrize("uri", ["pvc://claim/../../etc", "pvc://claim/a/../b", "pvc://claim/./a"])
def test_a_pvc_path_with_dot_segments_is_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="spec.model"):
        parse_model(uri)
