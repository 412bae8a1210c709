"""sha256 verification of cached files against the tree listing, with a journal for resumed runs.

Every file is checked against what the Hub publishes for it: the LFS sha256 for LFS files (all
weights), the git blob id (sha1 of ``blob <size>\\0<content>``) for small files. Both come out of
one read (the git id only for non-LFS files). The sha256 goes into the manifest for every file.

Hashing overlaps the download (``StreamingDigest``): while huggingface_hub writes a file, a thread reads
the bytes back from the page cache as they land and hashes them, so a file is verified moments after its
last byte arrives instead of being read again from the start. The streamed digest is used only when it
provably covers the final file: huggingface_hub's plain HTTP writer (not Xet), one bar from byte 0, one
partial file, no rewind of the transfer, and the final blob is the inode that was read, of the size that
was hashed. Otherwise (the blob was already in the store, another writer, a resume the server ignored),
and whenever it disagrees with the Hub, the file on disk is hashed again and that is the verdict. A
stream can therefore only ever cause a re-read, never the acceptance of bytes that are not on disk.

The journal (``<cache>/state/verified/models--org--name--<commit>.json``) remembers files already
verified (blob, size, mtime, sha256), so a run restarted after ``kill -9`` neither fetches nor
re-hashes them. It is only a shortcut for this volume's own earlier work; the manifest is the proof.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from vllm_runtime.cache.durable import Writeback
from vllm_runtime.cache.manifest import atomic_write_json
from vllm_runtime.cache.selection import HubFile

READ_SIZE = 8 * 1024 * 1024
HTTP_GET_BAR = "huggingface_hub.http_get"  # the name huggingface_hub gives the bar of a plain HTTP download
# A streaming reader that finds no new bytes waits at most this long for huggingface_hub's next chunk.
STREAM_POLL_SECONDS = 0.2
# The reader is woken once this many reported bytes have accumulated, not once per chunk (64 KiB when
# huggingface_hub passes the body through unchunked): fewer, larger reads and no thread ping-pong.
WAKE_BYTES = 4 * 1024 * 1024

Digests = tuple[str, str | None]  # (sha256, git blob sha1 or None)


def _new_hashers(size: int, git_oid: bool) -> tuple[Any, Any]:
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode()) if git_oid else None  # noqa: S324 - git's id, not security
    return sha, git


def file_digests(path: Path, *, git_oid: bool = True) -> tuple[str, str | None]:
    """(sha256, git blob sha1 or None) of a file, in one pass.

    An LFS file's git oid is that of its pointer, not of its content, so callers skip it for LFS files.
    """
    sha, git = _new_hashers(path.stat().st_size, git_oid)
    with path.open("rb", buffering=0) as f:
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            sha.update(view[:n])
            if git is not None:
                git.update(view[:n])
    return sha.hexdigest(), git.hexdigest() if git is not None else None


class VerificationJournal:
    """Files verified so far for one commit; thread-safe; written atomically after each addition."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            data = json.loads(path.read_text())
            self.entries: dict[str, dict[str, Any]] = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def known_sha256(self, hub_file: HubFile, blob: Path) -> str | None:
        """The recorded sha256 if ``blob`` is unchanged since it was verified, else None."""
        entry = self.entries.get(hub_file.path)
        if not entry or entry.get("blob") != hub_file.blob_name:
            return None
        try:
            st = blob.stat()
        except OSError:
            return None
        if st.st_size != entry.get("size") or st.st_mtime_ns != entry.get("mtimeNs"):
            return None
        return str(entry["sha256"])

    def record(self, hub_file: HubFile, blob: Path, sha256: str) -> None:
        st = blob.stat()
        with self._lock:
            self.entries[hub_file.path] = {
                "blob": hub_file.blob_name, "size": st.st_size, "mtimeNs": st.st_mtime_ns, "sha256": sha256,
            }
            atomic_write_json(self.path, {"files": self.entries})

    def forget(self, hub_file: HubFile) -> None:
        with self._lock:
            if self.entries.pop(hub_file.path, None) is not None:
                atomic_write_json(self.path, {"files": self.entries})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class StreamingDigest:
    """Digests of one file computed while huggingface_hub downloads it.

    ``progress_class`` goes to ``hf_hub_download(tqdm_class=...)``. huggingface_hub creates the bar once the
    response has started, with the file's temporary ``<blob>.<id>.incomplete`` already open; the bar's
    creation starts a thread that reads that file from the page cache as it grows (bytes below the file's
    size are written) and hashes them. A negative ``update`` is huggingface_hub rewinding a transfer whose
    resume the server ignored: bytes already hashed may be rewritten, so the stream is void. ``digests``
    gives the result only when it covers exactly the final blob; callers hash the file again otherwise.
    """

    def __init__(self, blobs_dir: Path, hub_file: HubFile):
        self.blobs_dir, self.hub_file = blobs_dir, hub_file
        self._sha, self._git = _new_hashers(hub_file.size, hub_file.sha256 is None)
        self._hashed = 0
        self._reported = 0  # bytes huggingface_hub announced (each before writing them)
        self._woken_at = 0
        self._cpu_seconds = 0.0
        self._inode: tuple[int, int] | None = None
        self._void = False
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def progress_class(self) -> type[_StreamProgress]:
        stream = self

        class Progress(_StreamProgress):
            digest = stream

        return Progress

    @property
    def hashed_bytes(self) -> int:
        return self._hashed

    @property
    def cpu_seconds(self) -> float:
        """CPU time the reader thread spent reading back and hashing (0 without a reader)."""
        return self._cpu_seconds

    def bar_created(self, initial: int, writer: str | None) -> None:
        """Called in the download's thread while huggingface_hub holds the partial file open."""
        with self._lock:
            # Only http_get writes in order (Xet may not); a second bar or a resumed file hides bytes from us.
            if writer != HTTP_GET_BAR or self._thread is not None or self._void or initial:
                self._void = True
                return
            partial = list(self.blobs_dir.glob(f"{self.hub_file.blob_name}*.incomplete"))
            if len(partial) != 1:  # not huggingface_hub's layout, or another writer: hash the blob afterwards
                self._void = True
                return
            try:
                source = io.FileIO(partial[0], "rb")
            except OSError:
                self._void = True
                return
            st = os.fstat(source.fileno())
            self._inode = (st.st_dev, st.st_ino)
            self._thread = threading.Thread(target=self._read, args=(source,), name=f"hash-{self.hub_file.path}",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def progressed(self, n: float) -> None:
        if n < 0:  # bytes already hashed may be rewritten: nothing streamed so far can be trusted
            self._void = True
            self._wake.set()
            return
        self._reported += int(n)
        if self._reported - self._woken_at >= WAKE_BYTES:
            self._woken_at = self._reported
            self._wake.set()

    def _read(self, source: io.FileIO) -> None:
        began = time.thread_time()
        with source:
            buf = bytearray(READ_SIZE)
            view = memoryview(buf)
            writeback = Writeback(source.fileno())  # the bytes hashed have landed: start writing them out
            try:
                while not self._void:
                    over = self._done.is_set()  # before reading: then this read sees the last byte
                    self._wake.clear()  # before reading: a chunk landing meanwhile wakes the next wait
                    if n := source.readinto(buf):
                        self._sha.update(view[:n])
                        if self._git is not None:
                            self._git.update(view[:n])
                        self._hashed += n
                        writeback.landed(self._hashed)
                    elif over:
                        return  # the download is over and every byte of the file is hashed
                    else:
                        self._wake.wait(STREAM_POLL_SECONDS)
            except OSError:
                self._void = True
            finally:
                self._cpu_seconds = time.thread_time() - began

    def finish(self) -> None:
        """The download returned or failed: hash what is left and stop the reader."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def digests(self, blob: Path) -> Digests | None:
        """The streamed digests if they cover exactly ``blob``'s bytes, else None."""
        self.finish()
        if self._thread is None or self._void or self._inode is None:
            return None
        try:
            st = blob.stat()
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != self._inode or st.st_size != self._hashed:
            return None
        return self._sha.hexdigest(), self._git.hexdigest() if self._git is not None else None


class _StreamProgress(hf_tqdm):
    """The progress bar huggingface_hub reports each chunk to; forwards to its ``StreamingDigest``.

    A subclass of huggingface_hub's tqdm, so it is told which writer created it (``name``); bars are
    disabled in the cache command, which makes tqdm's own part a no-op.
    """

    digest: StreamingDigest

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        writer, initial = kwargs.get("name"), int(kwargs.get("initial") or 0)
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # tqdm is untyped
        self.digest.bar_created(initial, writer)

    def update(self, n: float | None = 1) -> bool | None:
        self.digest.progressed(n or 0)
        result: bool | None = super().update(n)
        return result


def _matches(hub_file: HubFile, size: int, digests: Digests) -> bool:
    sha256, git_oid = digests
    if size != hub_file.size:
        return False
    return sha256 == hub_file.sha256 if hub_file.sha256 else git_oid == hub_file.git_oid


def verify_file(hub_file: HubFile, path: Path, streamed: Digests | None = None) -> tuple[bool, str]:
    """(matches what the Hub published, sha256 of the file).

    ``streamed`` (from ``StreamingDigest``) is trusted only when it matches; a mismatch is confirmed by
    hashing the file on disk, which is what stays on the volume.
    """
    size = path.stat().st_size
    if streamed is not None and _matches(hub_file, size, streamed):
        return True, streamed[0]
    digests = file_digests(path, git_oid=hub_file.sha256 is None)
    return _matches(hub_file, path.stat().st_size, digests), digests[0]
