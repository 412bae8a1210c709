"""Hashing while downloading (``verify.StreamingDigest``): the streamed digest replaces the re-read only
when it provably covers the final file, and a file is never trusted on a stream that was void."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cache_helpers import cache_in_process

from vllm_runtime.cache import verify
from vllm_runtime.cache.selection import HubFile
from vllm_runtime.devhub.server import DevHub, Fault
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


@pytest.mark.parametrize("tamper", ["replace_blob", "resumed_bar", "second_bar", "xet_writer", "no_partial_file"])
def test_a_stream_that_may_not_cover_the_blob_is_not_used(blobs: Path, tamper: str) -> None:
    hub_file = lfs_file()
    if tamper == "no_partial_file":
        stream = verify.StreamingDigest(blobs, hub_file)
        bar(stream).update(10)
        (blobs / hub_file.blob_name).write_bytes(CONTENT)
        assert stream.digests(blobs / hub_file.blob_name) is None
        return
    download = FakeDownload(blobs, hub_file)
    if tamper in ("resumed_bar", "xet_writer"):  # in place of the bar above
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
