"""The sibling cache server: a replica serves its verified cache, read-only, to replicas filling theirs.

It speaks the download half of the Hub's protocol (``vllm_runtime.hubproto``), so a filling replica (or
``huggingface_hub.hf_hub_download`` itself) reads it like the Hub:

    HEAD|GET /{org}/{name}/resolve/{40-hex commit}/{path}     (Range, ETag, X-Repo-Commit, X-Linked-*)
    GET /health                                               200 "ok"

What it serves, and nothing else: the files listed in a verified completion manifest
(``<cache>/manifests/models--org--name/<commit>.json``) of the requested commit, read through the
snapshot's link to its blob. It never serves a branch or tag name (a sibling is not a source of truth for
what a revision means), no ``/api`` metadata (file lists and sha256 come from the Hub), no other file of the
volume (manifests, locks, state, compile caches, anything a symlink points at outside the repo's
``blobs/``). A request path is decoded once, per segment: ``..``, ``.``, empty segments, encoded ``/`` or
``\\``, NUL and absolute paths are refused before any file is looked at, and the decoded path must equal a
manifest entry exactly. The blob opened must be a regular file directly inside that repo's ``blobs/``
with the manifest's size (an LFS file's blob must also be named by its sha256). No token is needed or read;
who may connect is the NetworkPolicy's job (the operator allows only pods of the same model).

The server does not re-hash what it serves: the filling side verifies every byte against the Hub's sha256,
so a sibling's bit rot costs a fallback, never a wrong file.

Threads, not an event loop: ``socket.sendfile`` moves the bytes in the kernel without holding the GIL, so
transfers cost the serving process (whose vLLM runs in a child process anyway) and its metrics endpoint
almost nothing. At most ``max_transfers`` bodies at once; more get 503 with ``Retry-After``, and the
filling side moves on to another sibling or the Hub. ``rate_limit`` (bytes per second per transfer) can keep
seeding from saturating the serving pod's network.

    vllm-runtime sibling --cache-dir /cache --port 8090 [--model org/name]   # standalone (tests, debugging)
    vllm-runtime serve ... --sibling-port 8090                               # what model pods run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from vllm_runtime.hubproto import RangeNotSatisfiable, file_headers, parse_range, safe_repo_path
from vllm_runtime.layout import CacheLayout, repo_folder_name

log = logging.getLogger("vllm_runtime.sibling")

DEFAULT_MAX_TRANSFERS = 64
CHUNK = 1024 * 1024
# /{org}/{name}/resolve/{commit}/{path}: repo id segments as the Hub allows them, a full commit id only.
_RESOLVE_RE = re.compile(
    r"^/(?P<org>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)/resolve/(?P<commit>[0-9a-f]{40})/"
    r"(?P<file>[^?#]+)$"
)


@dataclass(frozen=True)
class ServedFile:
    path: str
    size: int
    sha256: str
    lfs: bool


@dataclass(frozen=True)
class _Index:
    stamp: tuple[int, int, int]  # manifest's (inode, size, mtime_ns)
    files: dict[str, ServedFile]


class ManifestIndex:
    """Which files of which commit may be served: read from the verified manifests, re-read when they change."""

    def __init__(self, cache_dir: Path, repos: Collection[str] | None = None):
        self.layout = CacheLayout(cache_dir)
        self.repos = frozenset(repos) if repos else None
        self._cache: dict[tuple[str, str], _Index] = {}
        self._lock = threading.Lock()

    def files(self, repo_id: str, commit: str) -> dict[str, ServedFile] | None:
        if self.repos is not None and repo_id not in self.repos:
            return None
        path = self.layout.manifest_path(repo_id, commit)
        try:
            st = path.stat()
        except OSError:
            with self._lock:
                self._cache.pop((repo_id, commit), None)
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get((repo_id, commit))
        if cached is not None and cached.stamp == stamp:
            return cached.files
        files = self._read(path, repo_id, commit)
        if files is None:
            return None
        with self._lock:
            self._cache[(repo_id, commit)] = _Index(stamp, files)
        return files

    @staticmethod
    def _read(path: Path, repo_id: str, commit: str) -> dict[str, ServedFile] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("commit") != commit or data.get("verified") is not True:
            return None
        if data.get("repoId") != repo_id:
            return None
        files: dict[str, ServedFile] = {}
        for entry in data.get("files", []):
            try:
                rel, size, sha256, lfs = str(entry["path"]), int(entry["size"]), str(entry["sha256"]), bool(entry["lfs"])
            except (KeyError, TypeError, ValueError):
                continue
            if safe_repo_path(rel, encoded=False) != rel or not re.fullmatch(r"[0-9a-f]{64}", sha256):
                log.warning("manifest of %s@%s lists %r, which is not a plain repo path; not serving it",
                            repo_id, commit, rel)
                continue
            files[rel] = ServedFile(rel, size, sha256, lfs)
        return files

    def open(self, repo_id: str, commit: str, served: ServedFile) -> tuple[int, str] | None:
        """(an open read-only descriptor of the blob, its name) if it is safe to serve, else None."""
        repo_dir = self.layout.repo_dir(repo_id)
        try:
            blobs = os.path.realpath(repo_dir / "blobs")
            target = os.path.realpath(self.layout.snapshot_dir(repo_id, commit) / served.path)
        except (OSError, ValueError):
            return None
        if os.path.dirname(target) != blobs:
            log.warning("%s@%s:%s does not lead to a blob of the repo; not serving it", repo_id, commit, served.path)
            return None
        name = os.path.basename(target)
        if served.lfs and name != served.sha256:
            return None
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != served.size:
            os.close(fd)
            log.warning("%s@%s:%s changed on the volume (size %d, manifest %d); not serving it",
                        repo_id, commit, served.path, st.st_size, served.size)
            return None
        return fd, name


class SiblingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.served_bytes = Counter(
            "vllm_runtime_sibling_served_bytes", "File bytes served to sibling replicas", registry=r
        )
        self.requests = Counter(
            "vllm_runtime_sibling_requests", "Requests to the sibling cache server by status code", ["code"],
            registry=r,
        )
        self.active = Gauge("vllm_runtime_sibling_active_transfers", "File bodies being sent now", registry=r)


class SiblingServer:
    """Serves a cache volume's verified files over the Hub's download protocol, in background threads."""

    def __init__(
        self, cache_dir: str | Path, *, host: str = "0.0.0.0", port: int = 8090,  # noqa: S104 - pods listen on all
        repos: Collection[str] | None = None, max_transfers: int = DEFAULT_MAX_TRANSFERS,
        rate_limit: int | None = None, registry: CollectorRegistry | None = None,
    ):
        self.index = ManifestIndex(Path(cache_dir), repos)
        self.metrics = SiblingMetrics(registry)
        self.rate_limit = rate_limit
        self._slots = threading.BoundedSemaphore(max(1, max_transfers))
        self._stopping = threading.Event()
        handler = type("BoundSiblingHandler", (_SiblingHandler,), {"server_ref": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

    def start(self) -> SiblingServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sibling-server", daemon=True)
        self._thread.start()
        log.info("serving the verified cache to siblings on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _NotServed(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _SiblingHandler(BaseHTTPRequestHandler):
    server_ref: SiblingServer
    protocol_version = "HTTP/1.1"
    server_version = "vllm-runtime-sibling/1"
    timeout = 120  # an idle or stuck client does not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)

    def _refuse_method(self) -> None:
        self._reply_error(_NotServed(405, "read-only: GET and HEAD only", {"Allow": "GET, HEAD"}), head=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _handle(self, *, head: bool) -> None:
        server = self.server_ref
        raw = urlsplit(self.path).path
        try:
            if raw == "/health":
                self._reply(200, b"ok\n", head=head)
                return
            m = _RESOLVE_RE.match(raw)
            if m is None:
                raise _NotServed(404, "not found")
            rel = safe_repo_path(m["file"], encoded=True)
            if rel is None:
                raise _NotServed(404, "not found")
            repo_id, commit = f"{m['org']}/{m['name']}", m["commit"]
            files = server.index.files(repo_id, commit)
            if files is None:
                raise _NotServed(404, f"{repo_id}@{commit} is not cached here", {"X-Error-Code": "RevisionNotFound"})
            served = files.get(rel)
            if served is None:
                raise _NotServed(404, "not in the cached commit", {"X-Error-Code": "EntryNotFound"})
            opened = server.index.open(repo_id, commit, served)
            if opened is None:
                raise _NotServed(404, "not servable", {"X-Error-Code": "EntryNotFound"})
            fd, blob = opened
            try:
                self._send_file(fd, blob, served, commit, head=head)
            finally:
                os.close(fd)
        except _NotServed as err:
            self._reply_error(err, head=head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def _send_file(self, fd: int, blob: str, served: ServedFile, commit: str, *, head: bool) -> None:
        server = self.server_ref
        try:
            start, end, partial = parse_range(self.headers.get("Range"), served.size)
        except RangeNotSatisfiable as err:
            raise _NotServed(416, str(err), err.headers) from None
        headers = file_headers(
            size=served.size, start=start, end=end, partial=partial,
            etag=served.sha256 if served.lfs else blob, filename=served.path,
            lfs_sha256=served.sha256 if served.lfs else None, commit=commit,
        )
        length = end - start + 1 if served.size else 0
        if head or not length:
            self._start(206 if partial else 200, headers)
            return
        if not server._slots.acquire(blocking=False):
            raise _NotServed(503, "busy", {"Retry-After": "1"})
        server.metrics.active.inc()
        try:
            self._start(206 if partial else 200, headers)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                sent = self._send_body(f, start, length)
            if sent < length:
                self.close_connection = True
        finally:
            server.metrics.active.dec()
            server._slots.release()

    def _send_body(self, f: Any, start: int, length: int) -> int:
        server = self.server_ref
        if server.rate_limit is None:
            sent = 0
            try:
                self.wfile.flush()
                sent = int(self.connection.sendfile(f, start, length))
            finally:
                server.metrics.served_bytes.inc(sent)
            return sent
        began, sent = time.monotonic(), 0
        chunk = max(min(CHUNK, server.rate_limit // 20), 4096)
        f.seek(start)
        while sent < length:
            data = f.read(min(chunk, length - sent))
            if not data:
                break
            self.wfile.write(data)
            sent += len(data)
            server.metrics.served_bytes.inc(len(data))
            ahead = sent / server.rate_limit - (time.monotonic() - began)
            if ahead > 0 and server._stopping.wait(ahead):
                break
        return sent

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.server_ref.metrics.requests.labels(code=str(status)).inc()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _reply(self, status: int, body: bytes, *, head: bool, headers: dict[str, str] | None = None) -> None:
        self._start(status, {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body)),
                             **(headers or {})})
        if not head:
            self.wfile.write(body)

    def _reply_error(self, err: _NotServed, *, head: bool) -> None:
        body = json.dumps({"error": err.message}).encode()
        self._start(err.status, {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                 "X-Error-Message": err.message, **err.headers})
        if not head:
            self.wfile.write(body)


def served_commits(cache_dir: Path, repos: Collection[str] | None = None) -> list[str]:
    """``org/name@commit`` of every verified manifest the server would serve (for the start-up log)."""
    found = []
    for path in sorted(CacheLayout(cache_dir).manifests.glob("models--*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        repo = str(data.get("repoId", ""))
        if data.get("verified") is True and path.parent.name == repo_folder_name(repo) and (not repos or repo in repos):
            found.append(f"{repo}@{path.stem}")
    return found


def main(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir)
    repos = args.model or None
    server = SiblingServer(cache_dir, host=args.host, port=args.port, repos=repos,
                           max_transfers=args.max_transfers, rate_limit=args.rate_limit).start()
    log.info("sibling server on %s: %s", server.url, ", ".join(served_commits(cache_dir, repos)) or "nothing cached yet")
    print(json.dumps({"url": server.url, "port": server.port}), flush=True)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    stop.wait()
    server.stop()
    return 0


def add_server_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """``--{prefix}max-transfers`` and ``--{prefix}rate-limit`` (serve uses prefix ``sibling-``)."""
    parser.add_argument(f"--{prefix}max-transfers", type=int, default=DEFAULT_MAX_TRANSFERS,
                        help=f"file bodies sent at once; more get 503 (default: {DEFAULT_MAX_TRANSFERS})")
    parser.add_argument(f"--{prefix}rate-limit", type=int, default=None, metavar="BYTES_PER_SECOND",
                        help="cap each transfer's rate (default: none)")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sibling",
        help="serve this cache volume's verified files to sibling replicas (read-only, Hub protocol)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--cache-dir", required=True, help="the cache volume's mount")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")  # noqa: S104
    parser.add_argument("--port", type=int, default=8090, help="listen port; 0 picks a free one (default: 8090)")
    parser.add_argument("--model", action="append", default=[], metavar="ORG/NAME",
                        help="serve only this repo's commits (repeatable; default: every verified manifest)")
    add_server_arguments(parser)
    parser.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (default: INFO)")
    parser.set_defaults(func=main)
