"""Hashing while downloading (``verify.StreamingDigest``): the streamed digest replaces the re-read only
when it provably covers the final file, and a file is never trusted on a stream that was void."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cache_helpers import cache_in_process

from vllm_runtime.cache import verify
from vllm_runtime.cache.selection import HubFile
from vllm_runtime.devhub import server
from vllm_runtime.devhub.server import DevHub, Fault
from vllm_runtime.devhub.tiny_model import generate
from vllm_runtime.layout import CacheLayout

CHUNKS = [bytes([i]) * 300_000 for i in range(7)]
CONTENT = b"".join(CHUNKS)


def lfs_file(content: bytes = CONTENT) -> HubFile:
    return HubFile("model.safetensors", len(content), "0" * 40, hashlib.sha256(content).hexdigest())


def bar(stream: verify.StreamingDigest, *, writer: str = verify.HTTP_GET_BAR, **kwargs: object) -> object:
    """The bar as huggingface_hub creates it (``_create_progress_bar`` for a subclass of its tqdm)."""
    return stream.progress_class(disable=True, name=writer, unit="B", **({"initial": 0} | kwargs))


class FakeDownload:
    """What huggingface_hub's ``http_get`` does to the bar and the file, step by step."""

    def __init__(self, blobs: Path, hub_file: HubFile):
        self.blobs, self.hub_file = blobs, hub_file
        self.stream = verify.StreamingDigest(blobs, hub_file)
        self.partial = blobs / f"{hub_file.blob_name}.1a2b3c4d.incomplete"
        self.blob = blobs / hub_file.blob_name
        self.file = self.partial.open("wb")
        self.bar = bar(self.stream, total=hub_file.size)

    def write(self, chunk: bytes) -> None:
        self.bar.update(len(chunk))  # before the write, as http_get does
        self.file.write(chunk)
        self.file.flush()

    def complete(self) -> verify.Digests | None:
        self.file.close()
        self.partial.rename(self.blob)
        return self.stream.digests(self.blob)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def re_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files hashed again from disk after their download."""
    seen: list[str] = []
    real = verify.file_digests

    def counting(path: Path, *, git_oid: bool = True) -> tuple[str, str | None]:
        seen.append(path.name)
        return real(path, git_oid=git_oid)

    monkeypatch.setattr(verify, "file_digests", counting)
    return seen


@pytest.fixture
def blobs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "blobs"
    path.mkdir()
    yield path


def test_streamed_digest_is_the_files_sha256(blobs: Path) -> None:
    download = FakeDownload(blobs, lfs_file())
    writer = threading.Thread(target=lambda: [download.write(c) for c in CHUNKS])
    writer.start()
    writer.join()
    digests = download.complete()
    assert digests == (hashlib.sha256(CONTENT).hexdigest(), None)
    assert verify.verify_file(download.hub_file, download.blob, digests) == (True, digests[0])


def test_small_file_gets_its_git_blob_id_streamed(blobs: Path) -> None:
    content = b'{"model_type": "llama"}\n'
    git_oid = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()  # noqa: S324 - git's id
    download = FakeDownload(blobs, HubFile("config.json", len(content), git_oid, None))
    download.write(content)
    assert download.complete() == (hashlib.sha256(content).hexdigest(), git_oid)


def test_a_rewound_transfer_voids_the_stream(blobs: Path) -> None:
    # The server ignored a resume's Range: http_get truncates, rolls the bar back and writes from 0 again,
    # here with different bytes at offsets the reader has already hashed.
    download = FakeDownload(blobs, lfs_file())
    for chunk in CHUNKS[:3]:
        download.write(chunk)
    wait_until(lambda: download.stream.hashed_bytes == 3 * len(CHUNKS[0]))  # the reader has hashed them
    download.file.seek(0)
    download.file.truncate()
    download.bar.update(-3 * len(CHUNKS[0]))
    for chunk in [b"\xee" * len(CHUNKS[0]), *CHUNKS[1:]]:
        download.write(chunk)
    assert download.complete() is None


def test_many_small_chunks_are_all_hashed(blobs: Path) -> None:
    # Bodies pass through unchunked (64 KiB reads, the last one short): the reader wakes in batches and
    # the bytes written after the last update are picked up when the download is over.
    content = bytes(range(256)) * 20_000 + b"tail"
    download = FakeDownload(blobs, lfs_file(content))
    pieces = [content[i : i + 65536] for i in range(0, len(content), 65536)]
    writer = threading.Thread(target=lambda: [download.write(p) for p in pieces])
    writer.start()
    writer.join()
    assert download.complete() == (hashlib.sha256(content).hexdigest(), None)
    assert download.stream.hashed_bytes == len(content)
    assert hash_threads() == []  # the reader has stopped


@pytest.mark.parametrize(
    "tamper",
    ["replace_blob", "truncated_blob", "resumed_bar", "second_bar", "xet_writer", "no_partial_file", "two_partial_files"],
)
def test_a_stream_that_may_not_cover_the_blob_is_not_used(blobs: Path, tamper: str) -> None:
    hub_file = lfs_file()
    if tamper == "no_partial_file":
        stream = verify.StreamingDigest(blobs, hub_file)
        bar(stream).update(10)
        (blobs / hub_file.blob_name).write_bytes(CONTENT)
        assert stream.digests(blobs / hub_file.blob_name) is None
        return
    if tamper == "two_partial_files":  # another process downloads the same blob: which file is ours?
        (blobs / f"{hub_file.blob_name}.99999999.incomplete").write_bytes(CONTENT)
    download = FakeDownload(blobs, hub_file)
    if tamper in ("resumed_bar", "xet_writer"):  # in place of the bar above
        download.stream.finish()
        download.stream = verify.StreamingDigest(blobs, hub_file)
        download.bar = bar(download.stream, **({"initial": 100} if tamper == "resumed_bar" else {"writer": "huggingface_hub.xet_get"}))
    if tamper == "second_bar":
        bar(download.stream)
    for chunk in CHUNKS:
        download.write(chunk)
    download.file.close()
    download.partial.rename(download.blob)
    if tamper == "replace_blob":  # another writer's file took the name: a different inode
        other = blobs / "other"
        other.write_bytes(CONTENT)
        other.rename(download.blob)
    if tamper == "truncated_blob":  # same inode, but shorter than what was hashed
        wait_until(lambda: download.stream.hashed_bytes == hub_file.size)
        with download.blob.open("r+b") as f:
            f.truncate(hub_file.size - 1)
    assert download.stream.digests(download.blob) is None


def test_a_mismatching_stream_is_confirmed_from_disk(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(CONTENT)
    wrong = ("f" * 64, None)
    assert verify.verify_file(lfs_file(), blob, wrong) == (True, hashlib.sha256(CONTENT).hexdigest())
    assert verify.verify_file(lfs_file(b"other"), blob, wrong)[0] is False


def test_cold_cache_verifies_from_the_stream_without_re_reading(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str],
    tmp_path: Path, re_reads: list[str],
) -> None:
    repo_id, commit = tiny_repo
    # a body cut short is resumed with a Range request: the stream goes on from where it was
    devhub.inject(Fault("truncate", path="*/resolve/*model.safetensors", method="GET", after_bytes=4096, times=1))
    result = cache_in_process(tmp_path / "cache", repo_id)
    assert result.ok and result.commit == commit
    assert re_reads == []  # every file verified from its stream
    snapshot = CacheLayout(tmp_path / "cache").snapshot_dir(repo_id, commit)
    for source in tiny_model_dir.iterdir():
        assert (snapshot / source.name).read_bytes() == source.read_bytes()


def test_corrupt_bytes_are_caught_by_the_stream_and_fetched_again(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str],
    tmp_path: Path, re_reads: list[str],
) -> None:
    repo_id, commit = tiny_repo
    devhub.inject(Fault("corrupt", path="*/resolve/*model.safetensors", method="GET", after_bytes=5000, times=1))
    result = cache_in_process(tmp_path / "cache", repo_id)
    assert result.ok
    source = (tiny_model_dir / "model.safetensors").read_bytes()
    # the stream disagreed once; the disk (blob named by its sha256) confirmed it before the refetch
    assert re_reads == [hashlib.sha256(source).hexdigest()]
    snapshot = CacheLayout(tmp_path / "cache").snapshot_dir(repo_id, commit)
    assert (snapshot / "model.safetensors").read_bytes() == source


# --- end to end: every way a file reaches the volume -------------------------------------------------------


def hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hash-")]


def assert_snapshot_is(cache: Path, repo_id: str, commit: str, source_dir: Path) -> None:
    """The snapshot holds the source's bytes, and the manifest's sha256 is each file's real sha256."""
    layout = CacheLayout(cache)
    snapshot = layout.snapshot_dir(repo_id, commit)
    manifest = json.loads(layout.manifest_path(repo_id, commit).read_text())
    for entry in manifest["files"]:
        data = (snapshot / entry["path"]).read_bytes()
        assert data == (source_dir / entry["path"]).read_bytes(), entry["path"]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), entry["path"]
    assert sorted(e["path"] for e in manifest["files"]) == sorted(p.name for p in source_dir.iterdir())
    assert hash_threads() == []  # every reader stopped, failed attempts' too


def test_a_resume_the_server_answers_from_byte_0_is_never_trusted(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str],
    tmp_path: Path, re_reads: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first body is cut after good bytes the reader has hashed; the resume's Range is ignored (200, as
    CloudFront with gzip does) and that body is corrupt inside the part already hashed. huggingface_hub
    rewinds and rewrites the file: a stream that went on would hash good prefix + good rest = the Hub's
    sha256 for a file that is corrupt on disk."""
    repo_id, commit = tiny_repo
    ignored: list[str] = []
    real = server._HubHandler._serve_file

    def ignoring_range(self: Any, method: str, entry: Any, extra: dict[str, str], fault: Fault | None) -> None:
        if method == "GET" and self.headers.get("Range") and entry.path == "model.safetensors" and not ignored:
            ignored.append(self.headers["Range"])
            del self.headers["Range"]
        real(self, method, entry, extra, fault)

    monkeypatch.setattr(server._HubHandler, "_serve_file", ignoring_range)
    devhub.inject(Fault("truncate", path="*/resolve/*model.safetensors", method="GET", after_bytes=300_000))
    devhub.inject(Fault("corrupt", path="*/resolve/*model.safetensors", method="GET", after_bytes=1000))
    result = cache_in_process(tmp_path / "cache", repo_id)
    assert result.ok
    assert ignored == ["bytes=300000-"]
    sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert re_reads == [sha]  # the void stream sent it to the disk, which showed the corruption
    assert [r.fault for r in devhub.content_gets("model.safetensors")] == ["truncate", "corrupt", None]
    assert_snapshot_is(tmp_path / "cache", repo_id, commit, tiny_model_dir)


def test_a_retried_download_streams_afresh(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str],
    tmp_path: Path, re_reads: list[str],
) -> None:
    # The first attempt streams part of the file, then the resume gets a 500: huggingface_hub deletes its
    # partial file, the cache's retry downloads it again with a new stream from byte 0.
    repo_id, commit = tiny_repo
    devhub.inject(Fault("truncate", path="*/resolve/*model.safetensors", method="GET", after_bytes=300_000))
    devhub.inject(Fault("status", path="*/resolve/*model.safetensors", method="GET", status=500))
    result = cache_in_process(tmp_path / "cache", repo_id)
    assert result.ok
    assert [r.status for r in devhub.content_gets("model.safetensors")] == [200, 500, 200]
    assert re_reads == []  # the second attempt's stream covers the whole file
    assert_snapshot_is(tmp_path / "cache", repo_id, commit, tiny_model_dir)


def test_corrupt_bytes_from_the_cdn_are_caught_and_fetched_again(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, re_reads: list[str],
) -> None:
    from hub_fixtures import TINY_REPO, hub_environment

    with DevHub(redirect_lfs=True) as hub:
        commit = hub.add_repo(TINY_REPO, tiny_model_dir)
        home = tmp_path / "home"
        home.mkdir()
        for key, value in hub_environment(hub, home).items():
            monkeypatch.setenv(key, value)
        hub.inject(Fault("corrupt", path="/cdn-lfs/*", method="GET", after_bytes=200_000))
        result = cache_in_process(tmp_path / "cache", TINY_REPO)
        assert result.ok
        assert [r.fault for r in hub.log_snapshot() if r.path.startswith("/cdn-lfs/")] == ["corrupt", None]
    sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert re_reads == [sha]  # once, to confirm the stream's mismatch; the refetch verified from its stream
    assert_snapshot_is(tmp_path / "cache", TINY_REPO, commit, tiny_model_dir)


@pytest.mark.parametrize("blob", ["good", "corrupt"])
def test_a_blob_already_in_the_store_is_hashed_from_disk(
    devhub: DevHub, tiny_repo: tuple[str, str], tiny_model_dir: Path, hub_environ: dict[str, str],
    tmp_path: Path, re_reads: list[str], blob: str,
) -> None:
    # huggingface_hub links a blob it already has (another commit's, a killed run's) without downloading:
    # nothing was streamed, so the file on disk is hashed, and a bad one is replaced.
    repo_id, commit = tiny_repo
    source = (tiny_model_dir / "model.safetensors").read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    blobs = CacheLayout(tmp_path / "cache").repo_dir(repo_id) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / sha).write_bytes(source if blob == "good" else source[:-1] + b"\0")
    result = cache_in_process(tmp_path / "cache", repo_id)
    assert result.ok
    assert re_reads == [sha]
    assert len(devhub.content_gets("model.safetensors")) == (0 if blob == "good" else 1)
    assert_snapshot_is(tmp_path / "cache", repo_id, commit, tiny_model_dir)


@pytest.fixture(scope="module")
def sharded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~24 MiB in 10 shards, three of them larger than huggingface_hub's 10 MiB download chunk."""
    return generate(tmp_path_factory.mktemp("sharded"), target_bytes=24 * 2**20, shard_bytes=3 * 2**20)


def test_eight_parallel_streams_each_cover_their_own_file(
    devhub: DevHub, sharded_model_dir: Path, hub_environ: dict[str, str], tmp_path: Path,
    re_reads: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo_id = "test-org/sharded"
    commit = devhub.add_repo(repo_id, sharded_model_dir)
    chunks: list[float] = []
    real = verify.StreamingDigest.progressed

    def recording(self: verify.StreamingDigest, n: float) -> None:
        chunks.append(n)
        real(self, n)

    monkeypatch.setattr(verify.StreamingDigest, "progressed", recording)
    bad = "model-00008-of-00010.safetensors"
    devhub.inject(Fault("corrupt", path=f"*/resolve/*{bad}", method="GET", after_bytes=5_000_000))
    result = cache_in_process(tmp_path / "cache", repo_id, max_workers=8)
    assert result.ok and result.files == len(list(sharded_model_dir.iterdir()))
    # only the corrupt shard was read back (once, to confirm); the other 14 files and its refetch: streams
    assert re_reads == [hashlib.sha256((sharded_model_dir / bad).read_bytes()).hexdigest()]
    assert_snapshot_is(tmp_path / "cache", repo_id, commit, sharded_model_dir)
    # bodies reach the file as they arrive, not re-chunked into 10 MiB copies (see run_cache)
    assert chunks and max(chunks) <= 1024 * 1024
