"""Fetching a commit's files from sibling replicas: the Hub says what the files are, siblings carry the bytes.

The trust anchor stays the Hub. The tree listing (paths, sizes, LFS sha256, git blob ids) comes from the
Hub, with the token when there is one; a sibling (``vllm_runtime.sibling_server``) is asked only for the
bytes of a file the listing names, by commit and path, with no Authorization header ever. Every byte is
hashed as it lands, into a temporary ``<blob>.sibling-<id>.incomplete`` next to huggingface_hub's own, and
the file is renamed into ``blobs/<sha256 or git oid>`` (and linked from ``snapshots/<commit>/<path>``)
only when its size and digest equal what the Hub published. Anything else (connection refused or dropped,
a stall past ``timeout``, a non-200 answer, a short or long body, a wrong digest) deletes the temporary file
and the next sibling is tried, then the Hub: nothing unverified is ever kept. A sibling that served wrong
bytes, or answered that it has no verified cache of the commit, is not asked again during this run; one that
could not be reached is skipped for ``retry_after`` seconds (it may still be starting).

Which sibling: the list is rotated per file, so several siblings share the load.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from prometheus_client import Gauge

from vllm_runtime.cache import progress
from vllm_runtime.cache.durable import Writeback
from vllm_runtime.cache.selection import HubFile

log = logging.getLogger("vllm_runtime.cache")

SIBLINGS_ENV = "VLLM_RUNTIME_SIBLINGS"
SOURCE_BYTES = Gauge(
    "vllm_runtime_cache_source_bytes", "File bytes of this run kept, by where they came from (hub or sibling)",
    ["source"], registry=progress.REGISTRY,
)
SIBLING_FALLBACKS = Gauge(
    "vllm_runtime_cache_sibling_fallbacks",
    "File transfers from a sibling in this run that failed (dead, wrong bytes, missing) and were redone elsewhere",
    registry=progress.REGISTRY,
)

READ_SIZE = 1024 * 1024
MAX_ERRORS_KEPT = 5
USER_AGENT = "vllm-runtime-cache/1 (sibling)"


def publish_source_metrics(stats: SourceStats) -> None:
    SOURCE_BYTES.labels(source="hub").set(stats.hub_bytes)
    SOURCE_BYTES.labels(source="sibling").set(stats.sibling_bytes)
    SIBLING_FALLBACKS.set(stats.fallbacks)


class SiblingURLError(ValueError):
    pass


def parse_sibling_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; raises SiblingURLError otherwise."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SiblingURLError(f"--sibling {url!r}: expected http://host:port (a peer pod's sibling port)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SiblingURLError(f"--sibling {url!r}: no credentials, query or fragment (siblings need no token)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise SiblingURLError(f"--sibling {url!r}: bad port") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def sibling_urls(flags: Sequence[str], env_value: str | None) -> list[str]:
    """The flags' URLs, then ``VLLM_RUNTIME_SIBLINGS``'s (comma or whitespace separated), without repeats."""
    raw = [*flags, *((env_value or "").replace(",", " ").split())]
    seen: dict[str, None] = {}
    for url in raw:
        if url.strip():
            seen.setdefault(parse_sibling_url(url), None)
    return list(seen)


class SiblingMiss(Exception):
    """This sibling did not deliver this file verified; ``integrity``: it sent wrong bytes."""

    def __init__(self, reason: str, *, integrity: bool = False, unreachable: bool = False, lacks_commit: bool = False,
                 received: int = 0):
        super().__init__(reason)
        self.reason, self.integrity, self.unreachable, self.received = reason, integrity, unreachable, received
        self.lacks_commit = lacks_commit


@dataclass
class SourceStats:
    """Bytes and files kept by source in one run, and the sibling transfers that were redone elsewhere."""

    hub_bytes: int = 0
    sibling_bytes: int = 0
    hub_files: int = 0
    sibling_files: int = 0
    fallbacks: int = 0
    discarded_bytes: int = 0  # received from siblings and thrown away
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    on_change: Callable[[SourceStats], None] | None = field(default=None, repr=False)

    def kept(self, source: str, size: int) -> None:
        with self._lock:
            if source == "sibling":
                self.sibling_bytes += size
                self.sibling_files += 1
            else:
                self.hub_bytes += size
                self.hub_files += 1
        if self.on_change is not None:
            self.on_change(self)

    def fallback(self, message: str, discarded: int) -> None:
        with self._lock:
            self.fallbacks += 1
            self.discarded_bytes += discarded
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(message[:200])
        if self.on_change is not None:
            self.on_change(self)

    def summary_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "hubBytes": self.hub_bytes, "siblingBytes": self.sibling_bytes,
            "hubFiles": self.hub_files, "siblingFiles": self.sibling_files,
            "siblingFallbacks": self.fallbacks,
        }
        if self.errors:
            fields["siblingErrors"] = list(self.errors)
        return fields


class SiblingPool:
    """Siblings that may hold ``repo_id@commit``; ``fetch`` puts one verified file in place or returns None."""

    def __init__(
        self, urls: Sequence[str], repo_id: str, commit: str, stats: SourceStats, *,
        timeout: float = 10.0, retry_after: float = 15.0,
    ):
        self.urls = list(urls)
        self.repo_id, self.commit, self.stats = repo_id, commit, stats
        self.timeout, self.retry_after = timeout, retry_after
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._bad: set[str] = set()  # served wrong bytes, or lacks the commit: not asked again in this run
        self._down_until: dict[str, float] = {}

    def _order(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            usable = [u for u in self.urls if u not in self._bad and self._down_until.get(u, 0.0) <= now]
        if not usable:
            return []
        shift = next(self._turn) % len(usable)
        return usable[shift:] + usable[:shift]

    def fetch(self, hub_file: HubFile, blobs_dir: Path, snapshot_dir: Path) -> str | None:
        """Fetch ``hub_file`` from the first sibling that delivers it verified; its sha256, or None."""
        for url in self._order():
            try:
                sha256 = self._fetch_from(url, hub_file, blobs_dir, snapshot_dir)
            except SiblingMiss as miss:
                with self._lock:
                    if miss.integrity or miss.lacks_commit:
                        self._bad.add(url)
                    elif miss.unreachable:
                        self._down_until[url] = time.monotonic() + self.retry_after
                log.warning("%s from sibling %s: %s; trying %s", hub_file.path, url, miss.reason,
                            "another sibling or the Hub")
                self.stats.fallback(f"{hub_file.path}: {url}: {miss.reason}", miss.received)
                continue
            self.stats.kept("sibling", hub_file.size)
            return sha256
        return None

    def _connection(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname or "", parts.port, timeout=self.timeout), parts.path

    def _fetch_from(self, url: str, hub_file: HubFile, blobs_dir: Path, snapshot_dir: Path) -> str:
        conn, prefix = self._connection(url)
        target = f"{prefix}/{quote(self.repo_id, safe='/')}/resolve/{self.commit}/{quote(hub_file.path, safe='/')}"
        blobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = blobs_dir / f"{hub_file.blob_name}.sibling-{uuid.uuid4().hex[:12]}.incomplete"
        received = 0
        try:
            try:
                conn.request("GET", target, headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as error:
                raise SiblingMiss(f"unreachable ({type(error).__name__})", unreachable=True) from None
            if response.status != 200:
                # RevisionNotFound: the sibling has no verified cache of this commit (yet): no file of it will come
                lacks = response.status == 404 and response.getheader("X-Error-Code") == "RevisionNotFound"
                raise SiblingMiss(f"HTTP {response.status}" + (" (commit not cached there)" if lacks else ""),
                                  lacks_commit=lacks)
            length = response.getheader("Content-Length")
            if length is None or not length.isdigit() or int(length) != hub_file.size:
                raise SiblingMiss(f"size {length} instead of {hub_file.size}", integrity=True)
            served_commit = response.getheader("X-Repo-Commit")
            if served_commit is not None and served_commit != self.commit:
                raise SiblingMiss(f"answered for commit {served_commit[:40]}", integrity=True)
            hasher = _Hasher(hub_file)
            body = response.fp  # a length-delimited body (Content-Length checked): read it straight from the buffer
            with open(tmp, "xb", buffering=0) as out:
                writeback = Writeback(out.fileno())
                try:
                    while received < hub_file.size:
                        view = hasher.buffer()
                        # readinto1: what the socket has now (one read), so bytes land as they come
                        n = body.readinto1(view[: min(len(view), hub_file.size - received)])
                        if not n:
                            break
                        out.write(view[:n])
                        hasher.feed(n)
                        received += n
                        writeback.landed(received)
                except (OSError, http.client.HTTPException) as error:
                    kind = "stalled" if isinstance(error, socket.timeout | TimeoutError) else "dropped"
                    raise SiblingMiss(f"transfer {kind} after {received} of {hub_file.size} bytes "
                                      f"({type(error).__name__})", unreachable=True, received=received) from None
                finally:
                    digest, git_oid = hasher.result()
            if received != hub_file.size:
                raise SiblingMiss(f"body ended after {received} of {hub_file.size} bytes", unreachable=True,
                                  received=received)
            if hub_file.sha256 and digest != hub_file.sha256:
                raise SiblingMiss(f"sha256 {digest} instead of {hub_file.sha256}", integrity=True, received=received)
            if git_oid is not None and git_oid != hub_file.git_oid:
                raise SiblingMiss(f"git blob id {git_oid} instead of {hub_file.git_oid}", integrity=True,
                                  received=received)
            blob = blobs_dir / hub_file.blob_name
            os.replace(tmp, blob)
            _link(snapshot_dir / hub_file.path, blob)
            return digest
        finally:
            tmp.unlink(missing_ok=True)
            conn.close()


class _Hasher:
    """sha256 (and, for a small file, its git blob id) of the bytes received, computed in its own thread.

    hashlib releases the GIL on large buffers, so hashing runs beside the socket reads and file writes on
    another core instead of after them. The receiver fills one of a few reused buffers (no fresh memory per
    chunk for the kernel to fault in), writes it out and hands it here; it is reused once hashed.
    """

    BUFFERS = 6

    def __init__(self, hub_file: HubFile):
        self._sha = hashlib.sha256()
        self._git = None if hub_file.sha256 else hashlib.sha1(f"blob {hub_file.size}\0".encode())  # noqa: S324
        size = max(64 * 1024, min(READ_SIZE, hub_file.size))
        self._views = [memoryview(bytearray(size)) for _ in range(self.BUFFERS)]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(self.BUFFERS):
            self._free.put(i)
        self._filled: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._current = -1
        self._thread = threading.Thread(target=self._run, name="sibling-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._filled.get()) is not None:
            index, n = item
            chunk = self._views[index][:n]
            self._sha.update(chunk)
            if self._git is not None:
                self._git.update(chunk)
            self._free.put(index)

    def buffer(self) -> memoryview:
        """A buffer to receive into (waits while every buffer is still being hashed)."""
        if self._current < 0:
            self._current = self._free.get()
        return self._views[self._current]

    def feed(self, n: int) -> None:
        """The first ``n`` bytes of the current buffer are received and written: hash them."""
        self._filled.put((self._current, n))
        self._current = -1

    def result(self) -> tuple[str, str | None]:
        self._filled.put(None)
        self._thread.join()
        return self._sha.hexdigest(), self._git.hexdigest() if self._git is not None else None


def _link(pointer: Path, blob: Path) -> None:
    """``snapshots/<commit>/<path>`` -> ``../../blobs/<blob>``, as huggingface_hub links them (atomically)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(blob, pointer.parent)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(relative, tmp)
    try:
        os.replace(tmp, pointer)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
