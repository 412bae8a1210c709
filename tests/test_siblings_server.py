"""The sibling cache server (``vllm_runtime.sibling_server``) serves exactly the verified files of a cached
commit, over the Hub's download protocol, and refuses everything else. In-process servers on loopback.

Filling a cache from siblings: tests/test_siblings.py; with real processes and faults:
tests/test_siblings_loopback.py; with real vLLM: tests/test_siblings_e2e.py."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cache_helpers import cache_in_process
from hub_fixtures import TINY_REPO

from vllm_runtime.cache import read_manifest
from vllm_runtime.cache.manifest import atomic_write_json
from vllm_runtime.hubproto import safe_repo_path
from vllm_runtime.layout import CacheLayout
from vllm_runtime.sibling_server import SiblingServer


@pytest.fixture
def seeded(tmp_path: Path, tiny_repo: tuple[str, str], hub_environ: dict[str, str]) -> tuple[Path, str]:
    """A cache volume holding the tiny model's commit, verified (the sibling's volume)."""
    cache = tmp_path / "seed"
    result = cache_in_process(cache, TINY_REPO)
    assert result.ok, result
    return cache, tiny_repo[1]


@pytest.fixture
def sibling(seeded: tuple[Path, str]) -> Iterator[SiblingServer]:
    server = SiblingServer(seeded[0], host="127.0.0.1", port=0, repos=[TINY_REPO]).start()
    try:
        yield server
    finally:
        server.stop()


def raw_request(server: SiblingServer, path: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent byte for byte as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def manifest_of(cache: Path, commit: str) -> dict[str, dict[str, object]]:
    manifest = read_manifest(cache, TINY_REPO, commit)
    assert manifest is not None
    return {str(f["path"]): f for f in manifest["files"]}


def test_serves_a_manifest_file_with_the_hubs_headers(sibling: SiblingServer, seeded: tuple[Path, str]) -> None:
    cache, commit = seeded
    files = manifest_of(cache, commit)
    weights = files["model.safetensors"]
    status, headers, body = raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/model.safetensors")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == weights["sha256"]
    assert headers["x-repo-commit"] == commit
    assert headers["x-linked-etag"] == f'"{weights["sha256"]}"'
    assert headers["x-linked-size"] == str(weights["size"])
    status, headers, body = raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json", method="HEAD")
    config = CacheLayout(cache).snapshot_dir(TINY_REPO, commit) / "config.json"
    assert status == 200 and body == b""
    assert headers["etag"] == f'"{os.path.basename(os.path.realpath(config))}"'  # the git blob id, as the Hub
    assert "x-linked-etag" not in headers
    assert headers["content-length"] == str(config.stat().st_size)


def test_range_requests(sibling: SiblingServer, seeded: tuple[Path, str]) -> None:
    cache, commit = seeded
    blob = (CacheLayout(cache).snapshot_dir(TINY_REPO, commit) / "model.safetensors").read_bytes()
    path = f"/{TINY_REPO}/resolve/{commit}/model.safetensors"
    status, headers, body = raw_request(sibling, path, headers={"Range": "bytes=100-199"})
    assert (status, body) == (206, blob[100:200])
    assert headers["content-range"] == f"bytes 100-199/{len(blob)}"
    status, _, body = raw_request(sibling, path, headers={"Range": "bytes=-10"})
    assert (status, body) == (206, blob[-10:])
    status, headers, _ = raw_request(sibling, path, headers={"Range": f"bytes={len(blob)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(blob)}"


def test_hf_hub_download_reads_a_sibling_like_the_hub(sibling: SiblingServer, seeded: tuple[Path, str],
                                                      tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    cache, commit = seeded
    path = hf_hub_download(TINY_REPO, "model.safetensors", revision=commit, cache_dir=tmp_path / "hf",
                           endpoint=sibling.url, token=False)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == manifest_of(cache, commit)["model.safetensors"]["sha256"]


@pytest.mark.parametrize("suffix", [
    "../../../../manifests/models--test-org--tiny-llama/{commit}.json",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/manifests/models--test-org--tiny-llama/{commit}.json",
    "..%2f..%2f..%2fmanifests",
    "config.json%2f..",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "./config.json",
    "sub//config.json",
    "..%5c..%5cconfig.json",
    "config.json%00.txt",
    "secret.txt",  # in the snapshot directory, not in the manifest
    "../blobs",
    "",
])
def test_path_escapes_and_unlisted_files_are_refused(sibling: SiblingServer, seeded: tuple[Path, str],
                                                     suffix: str) -> None:
    cache, commit = seeded
    (CacheLayout(cache).snapshot_dir(TINY_REPO, commit) / "secret.txt").write_text("not for siblings")
    status, _, body = raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/" + suffix.format(commit=commit))
    assert status in (400, 404)
    assert b"not for siblings" not in body and b'"files"' not in body


def test_only_a_commit_of_an_allowed_repo(sibling: SiblingServer, seeded: tuple[Path, str]) -> None:
    cache, commit = seeded
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/main/config.json")[0] == 404  # no branch names
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{'0' * 40}/config.json")[0] == 404
    assert raw_request(sibling, f"/test-org/other/resolve/{commit}/config.json")[0] == 404
    assert raw_request(sibling, f"/api/models/{TINY_REPO}/tree/{commit}")[0] == 404  # never a metadata source
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json", method="POST")[0] == 405
    assert raw_request(sibling, "/health")[0] == 200
    restricted = SiblingServer(cache, host="127.0.0.1", port=0, repos=["test-org/other"]).start()
    try:
        assert raw_request(restricted, f"/{TINY_REPO}/resolve/{commit}/config.json")[0] == 404
    finally:
        restricted.stop()


def test_a_manifest_entry_leading_outside_the_blobs_is_refused(sibling: SiblingServer, seeded: tuple[Path, str],
                                                               tmp_path: Path) -> None:
    """Symlinks: a snapshot entry pointing at a file elsewhere, and a blob that is itself a link, serve nothing."""
    cache, commit = seeded
    layout = CacheLayout(cache)
    secret = tmp_path / "token"
    secret.write_text("hf_not_for_siblings")
    snapshot = layout.snapshot_dir(TINY_REPO, commit)
    (snapshot / "evil.json").symlink_to(secret)
    linked_blob = layout.repo_dir(TINY_REPO) / "blobs" / ("ab" * 20)
    linked_blob.symlink_to(secret)
    (snapshot / "evil2.json").symlink_to(os.path.relpath(linked_blob, snapshot))
    manifest_path = layout.manifest_path(TINY_REPO, commit)
    manifest = json.loads(manifest_path.read_text())
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    for name in ("evil.json", "evil2.json"):
        manifest["files"].append({"path": name, "size": secret.stat().st_size, "sha256": digest, "lfs": False})
    atomic_write_json(manifest_path, manifest)
    for name in ("evil.json", "evil2.json"):
        status, _, body = raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/{name}")
        assert status == 404 and b"hf_not_for_siblings" not in body
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json")[0] == 200  # the re-read manifest


def test_a_file_changed_on_the_volume_is_not_served(sibling: SiblingServer, seeded: tuple[Path, str]) -> None:
    cache, commit = seeded
    blob = (CacheLayout(cache).snapshot_dir(TINY_REPO, commit) / "config.json").resolve()
    with blob.open("ab") as f:
        f.write(b" ")
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json")[0] == 404


def test_an_unverified_or_missing_manifest_serves_nothing(sibling: SiblingServer, seeded: tuple[Path, str]) -> None:
    cache, commit = seeded
    manifest_path = CacheLayout(cache).manifest_path(TINY_REPO, commit)
    manifest = json.loads(manifest_path.read_text())
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json")[0] == 200
    atomic_write_json(manifest_path, {**manifest, "verified": False})
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json")[0] == 404
    manifest_path.unlink()
    assert raw_request(sibling, f"/{TINY_REPO}/resolve/{commit}/config.json")[0] == 404


def test_safe_repo_path() -> None:
    assert safe_repo_path("a/b.json", encoded=False) == "a/b.json"
    assert safe_repo_path("a%20b.json", encoded=True) == "a b.json"
    for bad in ("../a", "a/../b", "a//b", "/a", "a/", "a%2Fb", "a%5cb", "%2e%2e/a", "a\\b", "a%00"):
        assert safe_repo_path(bad, encoded=True) is None, bad
