"""A Hugging Face Hub-compatible HTTP server on loopback, for the demo, the tests and the benchmarks.

It serves model repos from local directories and answers the calls huggingface_hub 2.x makes
(see ``huggingface_hub/file_download.py``, ``hf_api.py`` and ``utils/_http.py``):

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: repo info with ``sha``
  (``?blobs=true`` adds sizes and LFS info to ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..``: the listing with git blob oids and,
  for LFS files, ``lfs.oid`` = sha256; paginated with a ``Link: <...>; rel="next"`` header;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (git oid, or sha256 for LFS
  files with ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``, and ``Range`` requests (206).

Errors use the Hub's headers, so huggingface_hub raises its typed errors: ``X-Error-Code`` RepoNotFound
(404), RevisionNotFound (404), EntryNotFound (404), GatedRepo (401 without a token, 403 with a wrong one).

Repos can have several commits, branches and tags (``add_commit``, ``create_branch``, ``create_tag``).
Faults can be injected per request pattern (5xx, 429 with ``Retry-After``, a stalled body, a truncated
body, a corrupted body, a delay), and every request is logged (method, path, status, whether an
Authorization header came, never its value) so tests can assert e.g. "no GET of file contents".

Why the stdlib ``ThreadingHTTPServer`` rather than aiohttp: it runs in a background thread of the
test process with no event loop to share, its blocking handlers make stalls and truncation trivial to
script, ``socket.sendfile`` keeps large transfers fast enough for the 1 GB benchmark, and it adds no
dependency to the runtime image.

    python -m vllm_runtime.devhub.server --repo org/name=DIR [--gated org/name=TOKEN] [--port N]
    python -m vllm_runtime.devhub.server --tiny org/tiny --port 8765     # generate and serve a tiny model
    python -m vllm_runtime.devhub.server --tiny org/tiny --tiny-adapter org/tiny-lora   # ... and a LoRA adapter

In Python::

    with DevHub() as hub:
        commit = hub.add_repo("org/tiny", model_dir)
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from vllm_runtime.hubproto import RangeNotSatisfiable, file_headers, parse_range

log = logging.getLogger(__name__)

# Files the Hub keeps in LFS in a typical model repo (its default .gitattributes), plus anything large.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1024 * 1024

# (path, size, mtime_ns) -> (git blob sha1, sha256): hashing a 1 GB model once per process is enough.
_HASH_CACHE: dict[tuple[str, int, int], tuple[str, str]] = {}
_HASH_CACHE_LOCK = threading.Lock()


def _file_hashes(path: Path) -> tuple[str, str]:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_CACHE_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    git = hashlib.sha1(f"blob {st.st_size}\0".encode())  # noqa: S324 - git's object id, not security
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * CHUNK):
            git.update(chunk)
            sha.update(chunk)
    result = (git.hexdigest(), sha.hexdigest())
    with _HASH_CACHE_LOCK:
        _HASH_CACHE[key] = result
    return result


@dataclass(frozen=True)
class RepoFile:
    path: str  # path in the repo, "/"-separated
    source: Path  # where the content is read from
    size: int
    git_oid: str
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        """What huggingface_hub names the blob after: sha256 for LFS files, the git oid otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


@dataclass
class Commit:
    sha: str
    files: dict[str, RepoFile]
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    token: str | None = None  # the Bearer token that opens a gated repo
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(sha)


@dataclass
class Fault:
    """A misbehaviour applied to matching requests.

    kind: ``status`` (answer ``status``), ``rate_limit`` (429 with ``Retry-After: retry_after``),
    ``stall`` (send the headers and ``after_bytes`` of the body, then nothing for ``seconds``, then close),
    ``truncate`` (send ``after_bytes`` of the body, then close), ``corrupt`` (flip the byte at offset
    ``after_bytes`` of the body; headers unchanged), ``delay`` (sleep ``seconds`` before answering),
    ``body`` (answer 200 with ``body`` as ``content_type``: an HTML login page, truncated or wrong JSON).
    path: an fnmatch pattern against the decoded request path, e.g. ``*/resolve/*.safetensors``.
    times: how many matching requests it hits (None: all of them); ``hits`` counts them.
    """

    kind: str
    path: str = "*"
    method: str | None = None
    times: int | None = 1
    status: int = 500
    retry_after: float = 1
    after_bytes: int = 0
    seconds: float = 3600.0
    body: bytes = b""
    content_type: str = "application/json"
    hits: int = 0

    KINDS = frozenset({"status", "rate_limit", "stall", "truncate", "corrupt", "delay", "body"})

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {sorted(self.KINDS)}")

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return fnmatch.fnmatchcase(path, self.path)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # decoded path, without the query
    query: dict[str, list[str]]
    status: int
    authorized: bool  # an Authorization header was sent (its value is never recorded)
    range: str | None
    bytes_sent: int
    fault: str | None

    @property
    def is_client_telemetry(self) -> bool:
        """huggingface_hub's own once-a-day fetch of its agent registry (not about any repo)."""
        return self.path == "/api/agent-harnesses"

    @property
    def is_file_content(self) -> bool:
        """A GET of a file's contents (what a warm cache must never do)."""
        return self.method == "GET" and ("/resolve/" in self.path or self.path.startswith("/cdn-lfs/"))


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class DevHub:
    """The loopback Hub. Thread-safe; start with ``start()`` or use as a context manager."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, tree_page_size: int = 1000, redirect_lfs: bool = False
    ):
        self.host, self.port = host, port
        self.tree_page_size = tree_page_size
        # Like the real Hub, answer LFS resolves with a 302 to a "CDN" on another origin (here: "localhost"
        # instead of the endpoint's address), so huggingface_hub drops the Authorization header there.
        self.redirect_lfs = redirect_lfs
        # Slows file bodies down (bytes per second per request); None: as fast as the disk allows.
        self.throttle_bytes_per_second: int | None = None
        # Caps all file bodies together (bytes per second), like a Hub or egress link shared by every client.
        self.rate_limit_bytes_per_second: int | None = None
        self._pacer = _Pacer()
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._active = 0  # requests being handled
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> DevHub:
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, name="devhub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases stalled responses
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> DevHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- repos
    def add_repo(
        self, repo_id: str, directory: str | Path, *, gated: bool = False, token: str | None = None,
        branch: str = "main",
    ) -> str:
        """Create a repo whose first commit (on ``branch``) is ``directory``; returns the commit sha."""
        with self._lock:
            self.repos[repo_id] = Repo(repo_id, gated=gated, token=token)
        return self.add_commit(repo_id, directory, branch=branch)

    def add_commit(self, repo_id: str, directory: str | Path, *, branch: str = "main") -> str:
        """Add a commit with the files of ``directory`` on top of ``branch`` and move the branch to it."""
        files: dict[str, RepoFile] = {}
        root = Path(directory)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(".git/") or rel == ".git":
                continue
            git_oid, sha256 = _file_hashes(path)
            size = path.stat().st_size
            lfs = rel.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            files[rel] = RepoFile(rel, path, size, git_oid, sha256, lfs)
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            digest = hashlib.sha1(  # noqa: S324 - an id, like git's
                json.dumps([parent, len(repo.commits), [(f.path, f.git_oid) for f in files.values()]]).encode()
            ).hexdigest()
            date = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", ".000Z")
            repo.commits[digest] = Commit(digest, files, parent, date)
            repo.branches[branch] = digest
        return digest

    def create_branch(self, repo_id: str, branch: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].branches[branch] = commit

    def create_tag(self, repo_id: str, tag: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].tags[tag] = commit

    # ---- faults and the request log
    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled (a handler logs its request when it finishes).

        Stalled responses (fault ``stall``) do not count: they are logged when the stall ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return True
            time.sleep(0.01)
        return False

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def log_snapshot(self) -> list[RequestRecord]:
        """The request log, once requests being handled are logged (a handler logs after its last byte)."""
        self.wait_idle()
        with self._lock:
            return list(self.requests)

    def repo_requests(self) -> list[RequestRecord]:
        """Every logged request about repos (leaves out huggingface_hub's client-telemetry fetch)."""
        return [r for r in self.log_snapshot() if not r.is_client_telemetry]

    def content_gets(self, filename: str | None = None) -> list[RequestRecord]:
        """GETs of file contents, optionally only of files whose path ends with ``filename``."""
        return [
            r for r in self.log_snapshot()
            if r.is_file_content and (filename is None or r.path.endswith("/" + filename))
        ]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)


_API_RE = re.compile(r"^/api/models/(?P<org>[^/]+)/(?P<name>[^/]+)(?:/(?P<op>revision|tree)/(?P<rest>.+))?$")
_RESOLVE_RE = re.compile(r"^/(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN_RE = re.compile(r"^/cdn-lfs/(?P<sha>[0-9a-f]{64})/(?P<file>.+)$")


class _Pacer:
    """One virtual clock shared by every transfer: together they send at most ``rate`` bytes per second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0.0

    def reserve(self, n: int, rate: int) -> float:
        """Account ``n`` bytes just sent; returns how long the sender must wait before its next chunk."""
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - 0.05) + n / rate  # at most 50 ms of credit for an idle link
            return self._next - now


class _HubHandler(BaseHTTPRequestHandler):
    hub: DevHub
    protocol_version = "HTTP/1.1"
    server_version = "vllm-runtime-devhub/1"

    # Per-request state for the log.
    _status = 0
    _sent = 0
    _fault_kind: str | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    # ---- dispatch
    def _handle(self, method: str) -> None:
        self._status, self._sent, self._fault_kind = 0, 0, None
        split = urlsplit(self.path)
        raw_path, query = split.path, parse_qs(split.query)
        path = unquote(raw_path)
        with self.hub._lock:
            self.hub._active += 1
        try:
            fault = self.hub._take_fault(method, path)
            if fault is not None:
                self._fault_kind = fault.kind
                if fault.kind == "delay":
                    self.hub._stopping.wait(fault.seconds)
                elif fault.kind == "status":
                    raise HubError(fault.status, None, f"injected {fault.status}")
                elif fault.kind == "rate_limit":
                    raise HubError(429, None, "injected rate limit", {"Retry-After": f"{fault.retry_after:g}"})
                elif fault.kind == "body":
                    self._send_body_bytes(fault.body, fault.content_type)
                    return
            if raw_path == "/api/agent-harnesses":  # huggingface_hub's daily client-detection fetch
                self._send_json({"standardEnvVars": [], "harnesses": {}})
            elif m := _API_RE.match(raw_path):
                self._api(m, query)
            elif m := _RESOLVE_RE.match(raw_path):
                self._resolve(method, m, fault)
            elif m := _CDN_RE.match(raw_path):
                self._cdn(method, m, fault)
            else:
                raise HubError(404, None, "Not Found")
        except HubError as err:
            self._send_error(err, head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.hub._record(
                RequestRecord(
                    method=method,
                    path=path,
                    query=query,
                    status=self._status,
                    authorized="Authorization" in self.headers,
                    range=self.headers.get("Range"),
                    bytes_sent=self._sent,
                    fault=self._fault_kind,
                )
            )
            with self.hub._lock:
                self.hub._active -= 1

    def _repo(self, org: str, name: str) -> Repo:
        repo_id = f"{unquote(org)}/{unquote(name)}"
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _check_access(self, repo: Repo) -> None:
        if not repo.gated:
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise HubError(
                401, "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in.",
            )
        if auth[7:].strip() != repo.token:
            raise HubError(
                403, "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.hub.url}/{repo.repo_id} to ask for access.",
            )

    # ---- /api/models/...
    def _api(self, m: re.Match[str], query: dict[str, list[str]]) -> None:
        repo = self._repo(m["org"], m["name"])
        op, rest = m["op"], m["rest"]
        if op is None or op == "revision":
            commit = self._commit(repo, unquote(rest) if rest else "main")
            self._send_json(self._info(repo, commit, blobs=query.get("blobs", [""])[0] == "true"))
            return
        # tree/{rev}[/{path}]: the revision is one quoted segment, the path the rest.
        rev_segment, _, sub_path = rest.partition("/")
        commit = self._commit(repo, unquote(rev_segment))
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = _tree(commit, unquote(sub_path).strip("/"), recursive)
        if sub_path and not entries:
            raise HubError(404, "EntryNotFound", f"{sub_path} does not exist on {commit.sha}")
        cursor = int(query.get("cursor", ["0"])[0] or 0)
        page = entries[cursor : cursor + self.hub.tree_page_size]
        headers: dict[str, str] = {}
        if cursor + self.hub.tree_page_size < len(entries):
            params = "&".join(
                f"{k}={quote(v[0])}" for k, v in sorted(query.items()) if k != "cursor"
            )
            host = self.headers.get("Host") or f"{self.hub.host}:{self.hub.port}"
            nxt = f"http://{host}{urlsplit(self.path).path}?{params}&cursor={cursor + self.hub.tree_page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send_json(page, headers)

    def _info(self, repo: Repo, commit: Commit, *, blobs: bool) -> dict[str, Any]:
        siblings: list[dict[str, Any]] = []
        for f in commit.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],  # noqa: S324
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors", "llama"],
            "siblings": siblings,
        }

    # ---- /{repo}/resolve/{rev}/{file}
    def _resolve(self, method: str, m: re.Match[str], fault: Fault | None) -> None:
        repo = self._repo(m["org"], m["name"])
        commit = self._commit(repo, unquote(m["rev"]))
        self._check_access(repo)
        filename = unquote(m["file"])
        entry = commit.files.get(filename)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{filename} does not exist on {commit.sha}",
                           {"X-Repo-Commit": commit.sha})
        if entry.lfs and self.hub.redirect_lfs:
            cdn = f"http://localhost:{self.hub.port}/cdn-lfs/{entry.sha256}/{quote(filename.rsplit('/', 1)[-1])}"
            self._start_response(302, {
                "Location": cdn, "X-Repo-Commit": commit.sha, "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size), "ETag": f'"{entry.git_oid}"', "Content-Length": "0",
            })
            return
        self._serve_file(method, entry, {"X-Repo-Commit": commit.sha}, fault)

    def _cdn(self, method: str, m: re.Match[str], fault: Fault | None) -> None:
        """The "CDN" an LFS redirect points at: content by sha256, no auth (like a signed URL)."""
        for repo in list(self.hub.repos.values()):
            for commit in list(repo.commits.values()):
                for entry in commit.files.values():
                    if entry.lfs and entry.sha256 == m["sha"]:
                        self._serve_file(method, entry, {}, fault)
                        return
        raise HubError(404, None, "no such object")

    def _serve_file(self, method: str, entry: RepoFile, extra: dict[str, str], fault: Fault | None) -> None:
        try:
            start, end, partial = parse_range(self.headers.get("Range"), entry.size)
        except RangeNotSatisfiable as err:
            raise HubError(416, None, str(err), err.headers) from None
        headers = {
            **extra,
            **file_headers(size=entry.size, start=start, end=end, partial=partial, etag=entry.etag,
                           filename=entry.path, lfs_sha256=entry.sha256 if entry.lfs else None),
        }
        self._start_response(206 if partial else 200, headers)
        length = end - start + 1 if entry.size else 0
        if method == "GET" and length:
            self._send_body(entry.source, start, length, fault)

    def _send_body(self, source: Path, start: int, length: int, fault: Fault | None) -> None:
        throttle = self.hub.throttle_bytes_per_second
        with source.open("rb") as f:
            f.seek(start)
            if fault is None and throttle is None and self.hub.rate_limit_bytes_per_second is None:
                self.wfile.flush()
                self._sent += self.connection.sendfile(f, start, length)
                return
            self._send_chunks(f, length, fault, throttle)

    def _send_chunks(self, f: BinaryIO, length: int, fault: Fault | None, throttle: int | None) -> None:
        cut = fault.after_bytes if fault is not None and fault.kind in ("stall", "truncate") else None
        chunk_size = min(CHUNK, max(throttle // 10, 4096)) if throttle else CHUNK
        shared_rate = self.hub.rate_limit_bytes_per_second
        if shared_rate:
            chunk_size = min(chunk_size, max(shared_rate // 50, 4096))
        began = time.monotonic()
        remaining = length
        while remaining > 0:
            size = min(chunk_size, remaining)
            if cut is not None:
                if self._sent >= cut:
                    break
                size = min(size, cut - self._sent)
            chunk = f.read(size)
            if not chunk:
                break
            if fault is not None and fault.kind == "corrupt" and self._sent <= fault.after_bytes < self._sent + len(chunk):
                i = fault.after_bytes - self._sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            self.wfile.write(chunk)
            self._sent += len(chunk)
            remaining -= len(chunk)
            if throttle and remaining > 0:
                ahead = self._sent / throttle - (time.monotonic() - began)
                if ahead > 0 and self.hub._stopping.wait(ahead):
                    break
            if shared_rate and remaining > 0:
                ahead = self.hub._pacer.reserve(len(chunk), shared_rate)
                if ahead > 0 and self.hub._stopping.wait(ahead):
                    break
        self.wfile.flush()
        if fault is not None and fault.kind == "stall":
            with self.hub._lock:  # a stalled handler does not count as busy for wait_idle
                self.hub._active -= 1
            self.hub._stopping.wait(fault.seconds)
            with self.hub._lock:
                self.hub._active += 1
        if remaining > 0:
            self.close_connection = True  # the client sees a short body, as after a dropped connection

    # ---- responses
    def _start_response(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send_body_bytes(json.dumps(data).encode(), "application/json", headers)

    def _send_body_bytes(self, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self._start_response(200, {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _send_error(self, err: HubError, *, head: bool) -> None:
        body = json.dumps({"error": err.message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._start_response(err.status, headers)
        if not head:
            self.wfile.write(body)


def _tree(commit: Commit, sub_path: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = sub_path + "/" if sub_path else ""
    entries: list[dict[str, Any]] = []
    directories: set[str] = set()
    for f in commit.files.values():
        if not f.path.startswith(prefix):
            continue
        rest = f.path[len(prefix) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if not recursive and depth > 1:
                break
            directories.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(f.tree_entry())
    for d in sorted(directories):
        oid = hashlib.sha1(d.encode()).hexdigest()  # noqa: S324
        entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
    return sorted(entries, key=lambda e: str(e["path"]))


def _parse_pairs(values: list[str], flag: str) -> Iterator[tuple[str, str]]:
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise SystemExit(f"{flag} expects org/name=VALUE, got {value!r}")
        yield key, rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve local model directories as a Hugging Face Hub on loopback.")
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR", help="serve DIR as ORG/NAME")
    parser.add_argument("--tiny", action="append", default=[], metavar="ORG/NAME",
                        help="generate a tiny model into a temporary directory and serve it")
    parser.add_argument("--tiny-adapter", action="append", default=[], metavar="ORG/NAME",
                        help="generate a tiny LoRA adapter for the tiny model at two revisions (tags v1, v2; "
                        "main = v2) and serve it")
    parser.add_argument("--gated", action="append", default=[], metavar="ORG/NAME=TOKEN",
                        help="make a repo gated: files need 'Authorization: Bearer TOKEN'")
    parser.add_argument("--tag", action="append", default=[], metavar="ORG/NAME=TAG", help="tag main's commit")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--throttle", type=int, help="bytes per second per file transfer")
    parser.add_argument("--rate-limit", type=int, help="bytes per second of all file transfers together")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    hub = DevHub(args.host, args.port)
    hub.throttle_bytes_per_second = args.throttle
    hub.rate_limit_bytes_per_second = args.rate_limit
    repos = dict(_parse_pairs(args.repo, "--repo"))
    if args.tiny:
        import tempfile

        from vllm_runtime.devhub.tiny_model import generate

        scratch = Path(tempfile.mkdtemp(prefix="devhub-"))
        for i, repo_id in enumerate(args.tiny):
            repos[repo_id] = str(generate(scratch / str(i)))
    gated = dict(_parse_pairs(args.gated, "--gated"))
    for repo_id, directory in repos.items():
        commit = hub.add_repo(repo_id, directory, gated=repo_id in gated, token=gated.get(repo_id))
        print(f"{repo_id}: main -> {commit}{' (gated)' if repo_id in gated else ''}", flush=True)
    if args.tiny_adapter:
        import tempfile

        from vllm_runtime.devhub import tiny_adapter

        scratch = Path(tempfile.mkdtemp(prefix="devhub-adapters-"))
        for i, repo_id in enumerate(args.tiny_adapter):
            commits = tiny_adapter.publish(hub, repo_id, scratch, seeds=(10 * i + 1, 10 * i + 2))
            print(f"{repo_id}: v1 -> {commits[0]}, v2 = main -> {commits[1]} (LoRA adapter)", flush=True)
    for repo_id, tag in _parse_pairs(args.tag, "--tag"):
        hub.create_tag(repo_id, tag, hub.repos[repo_id].branches["main"])
    hub.start()
    print(f"serving on {hub.url} (set HF_ENDPOINT={hub.url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
