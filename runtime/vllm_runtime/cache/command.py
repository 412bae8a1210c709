"""``vllm-runtime cache``: pin a revision to a commit, download what vLLM needs, verify it, write a manifest.

The steps, each safe to interrupt with ``kill -9``:

1. Resolve the revision to a commit once (no request at all when it already is a commit).
2. If the commit's manifest exists and the snapshot has its files: done (no request for file contents).
3. Take the commit's file lock (``layout.lock_path``); other caches of the same commit wait here, then
   find the manifest and reuse it.
4. List the tree at the commit (sizes, LFS sha256), select the files (``selection``), compare what is
   missing with the free space, fetch with huggingface_hub's ``hf_hub_download`` (its cache layout,
   atomic blob writes and per-file locks), several files at once; each file is sha256-verified as soon
   as it lands (``verify``). A file failing verification is deleted and fetched again, once.
5. fsync the folders naming the files (each file was fsynced once verified; ``durable``), write the
   manifest atomically, then ``refs/<revision>``; report the summary.

Transient failures (Hub 5xx/429, dropped connections, stalls) are retried with exponential backoff
(honouring Retry-After); what is still failing becomes a summary with a reason and exit code 4
(retryable) or 3 (permanent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import filelock
import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.tqdm import disable_progress_bars

from vllm_runtime import summary, units
from vllm_runtime.cache import progress
from vllm_runtime.cache import errors
from vllm_runtime.cache.durable import fsync_path, make_durable
from vllm_runtime.cache.errors import CacheError, classify, is_retryable_transfer_error
from vllm_runtime.cache.manifest import (
    FORMAT_VERSION,
    atomic_write_json,
    read_manifest,
    snapshot_matches,
)
from vllm_runtime.cache.selection import HubFile, NoWeightsError, Selection, restrict_to_index, select_files
from vllm_runtime.cache.siblings import (
    SIBLINGS_ENV,
    SiblingPool,
    SiblingURLError,
    SourceStats,
    publish_source_metrics,
    sibling_urls,
)
from vllm_runtime.cache.usage import touch_last_used
from vllm_runtime.cache.verify import StreamingDigest, VerificationJournal, file_digests, verify_file
from vllm_runtime.layout import (
    TERMINATION_MESSAGE_PATH,
    CacheLayout,
    is_commit,
    parse_model,
    repo_folder_name,
    revision_problem,
)
from vllm_runtime.planner import spec as plan_spec

log = logging.getLogger("vllm_runtime.cache")
T = TypeVar("T")


@dataclass
class CacheOptions:
    model: str
    cache_dir: Path
    revision: str = "main"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    stall_timeout: float = 60.0
    retries: int = 4
    retry_backoff: float = 2.0
    max_workers: int = 8
    lock_timeout: float = 6 * 3600.0
    progress_interval: float = 10.0
    verify_existing: bool = False  # re-hash a cached commit's files before reusing it
    abort_after: float | None = None  # seconds without a byte before exiting; None: 10 x stall_timeout + 120
    termination_message_path: str | None = None  # for the last-resort abort (main() writes the normal summary)
    endpoint: str | None = None  # HF_ENDPOINT; None: huggingface_hub's default
    token: str | None = field(default=None, repr=False)  # HF_TOKEN; never logged
    siblings: Sequence[str] = ()  # peer replicas' sibling servers: file bytes from them, metadata from the Hub
    sibling_timeout: float = 10.0  # seconds to connect to a sibling, and without a byte from it


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class _Retrier:
    """Exponential backoff for transient Hub failures; honours Retry-After on 429."""

    def __init__(self, retries: int, backoff: float):
        self.retries, self.backoff = retries, backoff

    def delay(self, attempt: int, error: BaseException) -> float:
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            retry_after = error.response.headers.get("Retry-After")
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                return min(float(retry_after), 300.0)
        return float(min(self.backoff * 2**attempt, 60.0))

    def call(self, what: str, fn: Callable[[], T]) -> T:
        stalls = 0
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as error:  # noqa: BLE001 - classified below, re-raised when not transient
                if not is_retryable_transfer_error(error) or attempt >= self.retries:
                    raise
                if isinstance(error, httpx2.TimeoutException):
                    # huggingface_hub already resumed this file several times: one more try, then Stalled.
                    stalls += 1
                    if stalls > 1:
                        raise
                pause = self.delay(attempt, error)
                attempt += 1
                progress.RETRIES.inc()
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1f s", what, _describe(error), attempt, self.retries, pause
                )
                time.sleep(pause)


def _describe(error: BaseException) -> str:
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}"
    return type(error).__name__


class _Fetcher:
    """Downloads and verifies files of one commit, several at a time."""

    def __init__(self, opts: CacheOptions, repo_id: str, commit: str, journal: VerificationJournal):
        self.opts, self.repo_id, self.commit, self.journal = opts, repo_id, commit, journal
        self.layout = CacheLayout(opts.cache_dir)
        self.retrier = _Retrier(opts.retries, opts.retry_backoff)
        self.sha256: dict[str, str] = {}
        self.verification_seconds = 0.0
        self._in_flight = 0
        self._lock = threading.Lock()
        self.sources = SourceStats(on_change=publish_source_metrics)
        self.siblings = (
            SiblingPool(opts.siblings, repo_id, commit, self.sources, timeout=opts.sibling_timeout)
            if opts.siblings else None
        )

    def in_flight(self) -> int:
        return self._in_flight

    def fetch_all(self, files: Sequence[HubFile]) -> None:
        if not files:
            return
        with ThreadPoolExecutor(max_workers=max(1, self.opts.max_workers), thread_name_prefix="fetch") as pool:
            futures = [pool.submit(self.fetch, f) for f in files]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
            for future in futures:
                future.result()

    def _download_once(self, hub_file: HubFile) -> tuple[str, StreamingDigest]:
        stream = StreamingDigest(self.layout.repo_dir(self.repo_id) / "blobs", hub_file)  # hashed as bytes land
        with self._lock:  # counted only while transferring, not while sleeping between retries
            self._in_flight += 1
        try:
            return hf_hub_download(
                self.repo_id,
                hub_file.path,
                revision=self.commit,
                cache_dir=self.layout.hub_cache,
                endpoint=self.opts.endpoint,
                token=self.opts.token or False,
                etag_timeout=max(self.opts.stall_timeout, 1.0),
                tqdm_class=stream.progress_class,
            ), stream
        except BaseException:
            stream.finish()
            raise
        finally:
            with self._lock:
                self._in_flight -= 1

    def _download(self, hub_file: HubFile) -> tuple[Path, StreamingDigest]:
        path, stream = self.retrier.call(f"download of {hub_file.path}", lambda: self._download_once(hub_file))
        return Path(path), stream

    def _from_sibling(self, hub_file: HubFile) -> bool:
        """Try the siblings for a file not on the volume yet; True when it is now there, verified."""
        repo_dir = self.layout.repo_dir(self.repo_id)
        if self.siblings is None or (repo_dir / "snapshots" / self.commit / hub_file.path).exists():
            return False
        with self._lock:
            self._in_flight += 1
        try:
            sha256 = self.siblings.fetch(hub_file, repo_dir / "blobs", repo_dir / "snapshots" / self.commit)
        finally:
            with self._lock:
                self._in_flight -= 1
        if sha256 is None:
            return False
        self.journal.record(hub_file, repo_dir / "blobs" / hub_file.blob_name, sha256)
        self.sha256[hub_file.path] = sha256
        return True

    def fetch(self, hub_file: HubFile) -> None:
        self._fetch(hub_file)
        # On the disk now, while other files still download: the flush before the manifest finds little left.
        # (Through the snapshot's link: the blob it names, whatever the blob is called.)
        fsync_path(self.layout.snapshot_dir(self.repo_id, self.commit) / hub_file.path)

    def _fetch(self, hub_file: HubFile) -> None:
        if self._from_sibling(hub_file):
            return
        new = not (self.layout.repo_dir(self.repo_id) / "blobs" / hub_file.blob_name).exists()
        for attempt in (1, 2):
            pointer, stream = self._download(hub_file)
            blob = pointer.resolve()
            streamed = stream.digests(blob)  # also stops the stream's reader, whichever way this goes on
            known = self.journal.known_sha256(hub_file, blob)
            if known is not None:
                self.sha256[hub_file.path] = known
                return
            began = time.monotonic()
            ok, sha256 = verify_file(hub_file, blob, streamed)
            with self._lock:  # hashing done while downloading counts too (the reader thread's CPU time)
                self.verification_seconds += time.monotonic() - began + stream.cpu_seconds
            if ok:
                self.journal.record(hub_file, blob, sha256)
                self.sha256[hub_file.path] = sha256
                if new:
                    self.sources.kept("hub", hub_file.size)
                return
            progress.VERIFICATION_FAILURES.inc()
            expected = hub_file.sha256 or f"git oid {hub_file.git_oid}"
            log.warning(
                "%s failed verification (expected %s, got sha256 %s, %d bytes); deleting it%s",
                hub_file.path, expected, sha256, blob.stat().st_size,
                " and fetching it again" if attempt == 1 else "",
            )
            self.journal.forget(hub_file)
            pointer.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
        raise errors.VerificationFailed(
            f"{hub_file.path} of {self.repo_id}@{self.commit} did not match the sha256 the Hub publishes, twice; "
            "the Hub or a proxy in between is serving corrupt data: check HF_ENDPOINT (mirror) and retry",
        )


@contextmanager
def _commit_lock(path: Path, timeout: float, what: str) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    began = time.monotonic()
    logged = False
    while True:
        try:
            lock.acquire(timeout=5)
            break
        except filelock.Timeout:
            waited = time.monotonic() - began
            if not logged or int(waited) % 60 < 5:
                log.info("another process is caching %s; waiting for it (%.0f s so far)", what, waited)
                logged = True
            if waited >= timeout:
                raise errors.CacheBusy(
                    f"another process held the cache lock for {what} for {waited:.0f} s; retrying later"
                ) from None
    try:
        yield
    finally:
        lock.release()


def _success(
    opts: CacheOptions, repo_id: str, manifest: dict[str, Any], began: float, *, reused: bool, downloaded: int
) -> summary.Summary:
    touch_last_used(opts.cache_dir, repo_id, manifest["commit"])
    progress.COMPLETE.set(1)
    progress.CACHE_BYTES.set(manifest["bytes"])
    progress.CACHE_FILES.set(manifest["fileCount"])
    progress.TOTAL_BYTES.set(manifest["bytes"])
    progress.DOWNLOADED_BYTES.set(manifest["bytes"])
    progress.ETA.set(0)
    if not reused:
        progress.VERIFICATION_SECONDS.set(manifest.get("verificationSeconds", 0.0))
    return summary.Summary(
        ok=True,
        command="cache",
        model=opts.model,
        revision=opts.revision,
        commit=manifest["commit"],
        bytes=manifest["bytes"],
        files=manifest["fileCount"],
        verified=True,
        completedAt=manifest["completedAt"] if reused else _utc_now(),
        durationSeconds=round(time.monotonic() - began, 3),
        extra={
            "reused": reused, "downloadedBytes": downloaded, "weightFormat": manifest.get("weightFormat"),
            **({"hubBytes": 0, "siblingBytes": 0} if reused else manifest.get("sources", {})),
        },
    )


def _note_revision(opts: CacheOptions, repo_id: str, manifest: dict[str, Any]) -> None:
    """Remember the branch/tag name that led to this commit (refs file and manifest) for offline lookups."""
    revision, commit = opts.revision, manifest["commit"]
    if is_commit(revision):
        return
    layout = CacheLayout(opts.cache_dir)
    refs_dir = layout.repo_dir(repo_id) / "refs"
    ref = refs_dir / revision
    if revision_problem(revision) is not None or not ref.resolve().is_relative_to(refs_dir.resolve()):
        # run_cache refuses such revisions first; this keeps the write inside refs/ whatever the caller.
        log.warning("not recording revision %r: not a ref name inside %s", revision, refs_dir)
        return
    try:
        if not ref.exists() or ref.read_text().strip() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)
        if revision in manifest.get("revisions", []):
            return
        # Under the commit's lock, re-read: `rm`/`gc` may have removed the commit meanwhile, and a
        # manifest must never be re-created for files that are gone.
        with filelock.FileLock(str(layout.lock_path(repo_id, commit)), timeout=30):
            current = read_manifest(opts.cache_dir, repo_id, commit)
            if current is not None and revision not in current.get("revisions", []):
                current["revisions"] = sorted({*current.get("revisions", []), revision})
                atomic_write_json(layout.manifest_path(repo_id, commit), current)
    except (OSError, filelock.Timeout) as error:
        log.warning("could not record revision %s -> %s: %s", revision, commit, error)


def _warm(opts: CacheOptions, repo_id: str, commit: str) -> dict[str, Any] | None:
    manifest = read_manifest(opts.cache_dir, repo_id, commit)
    if manifest is None:
        return None
    if not snapshot_matches(opts.cache_dir, manifest):
        log.warning("the manifest of %s@%s lists files missing from the snapshot; caching again", repo_id, commit)
        return None
    return manifest


def _rehash_matches(opts: CacheOptions, manifest: dict[str, Any]) -> bool:
    """Re-hash every cached file (in parallel) against the manifest's sha256."""
    snapshot = CacheLayout(opts.cache_dir).snapshot_dir(manifest["repoId"], manifest["commit"])

    def check(entry: dict[str, Any]) -> bool:
        sha256, _ = file_digests(snapshot / entry["path"], git_oid=False)
        if sha256 != entry["sha256"]:
            log.warning("%s changed on the volume since it was verified (sha256 %s, expected %s)",
                        entry["path"], sha256, entry["sha256"])
            return False
        return True

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, opts.max_workers)) as pool:
        ok = all(list(pool.map(check, manifest["files"])))
    progress.VERIFICATION_SECONDS.set(time.monotonic() - began)
    return ok


def cache_hub_model(opts: CacheOptions, repo_id: str) -> summary.Summary:
    began = time.monotonic()
    layout = CacheLayout(opts.cache_dir)
    retrier = _Retrier(opts.retries, opts.retry_backoff)
    api = HfApi(endpoint=opts.endpoint, token=opts.token or False)
    if is_commit(opts.revision):
        commit = opts.revision
    else:
        info = retrier.call(f"resolving {repo_id}@{opts.revision}", lambda: api.repo_info(repo_id, revision=opts.revision))
        if not info.sha:
            raise errors.RevisionNotFound(f"the Hub returned no commit for {repo_id}@{opts.revision}")
        if not is_commit(info.sha):
            raise errors.InvalidHubResponse(
                f"the Hub resolved {repo_id}@{opts.revision} to {info.sha[:64]!r}, which is not a 40-hex commit id: "
                "HF_ENDPOINT must point at a Hugging Face Hub or a faithful mirror; pin spec.revision to a commit"
            )
        commit = info.sha
        log.info("resolved %s@%s to commit %s", repo_id, opts.revision, commit)
    warm = None if opts.verify_existing else _warm(opts, repo_id, commit)
    if warm is not None:
        log.info("%s@%s is already cached and verified (%d files, %s)", repo_id, commit, warm["fileCount"],
                 units.human_bytes(warm["bytes"]))
        _note_revision(opts, repo_id, warm)
        return _success(opts, repo_id, warm, began, reused=True, downloaded=0)

    with _commit_lock(layout.lock_path(repo_id, commit), opts.lock_timeout, f"{repo_id}@{commit}"):
        stale = read_manifest(opts.cache_dir, repo_id, commit)
        warm = _warm(opts, repo_id, commit)
        if warm is not None and opts.verify_existing and not _rehash_matches(opts, warm):
            warm = None
        if warm is None and stale is not None:
            # Files went missing or changed: the commit is no longer complete until cached again.
            layout.manifest_path(repo_id, commit).unlink(missing_ok=True)
        if warm is not None:
            log.info("another process cached %s@%s; reusing it", repo_id, commit)
            _note_revision(opts, repo_id, warm)
            return _success(opts, repo_id, warm, began, reused=True, downloaded=0)
        manifest, downloaded = _download_commit(opts, api, retrier, repo_id, commit, began)
    _note_revision(opts, repo_id, manifest)
    return _success(opts, repo_id, manifest, began, reused=False, downloaded=downloaded)


def _list_files(api: HfApi, retrier: _Retrier, repo_id: str, commit: str) -> list[HubFile]:
    entries = retrier.call(
        f"listing {repo_id}@{commit}", lambda: list(api.list_repo_tree(repo_id, revision=commit, recursive=True))
    )
    return [
        HubFile(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs is not None else None)
        for e in entries
        if isinstance(e, RepoFile)
    ]


def _check_space(layout: CacheLayout, blobs_dir: Path, selection: Selection, repo_id: str, commit: str) -> int:
    """Bytes still to download; raises InsufficientSpace when the volume cannot hold them.

    When short, commits no server uses are evicted first, least recently used first (``manage.make_room``):
    a revision change replaces old commits instead of filling the volume.
    """
    from vllm_runtime import manage  # manage imports cache modules; importing it here keeps the graph acyclic

    def missing_bytes() -> int:
        return sum(f.size for f in selection.files if not (blobs_dir / f.blob_name).exists())

    def free_bytes() -> int:
        return shutil.disk_usage(_existing_ancestor(layout.hub_cache)).free

    manage.make_room(layout.root, needed=missing_bytes, free=free_bytes, keep=(repo_id, commit))
    missing = {f.blob_name: f.size for f in selection.files if not (blobs_dir / f.blob_name).exists()}
    needed = sum(missing.values())
    where = _existing_ancestor(layout.hub_cache)
    free = shutil.disk_usage(where).free
    log.info("%s to download (%d files), %s free on %s", units.human_bytes(needed), len(missing),
             units.human_bytes(free), where)
    if needed > free:
        raise errors.InsufficientSpace(
            f"the model needs {needed} more bytes ({units.human_bytes(needed)}) but only {free} bytes "
            f"({units.human_bytes(free)}) are free on the cache volume: raise spec.cache.size (or use a larger "
            "existing claim), or free space with `vllm-runtime gc --max-size`",
        )
    return needed


def _download_commit(
    opts: CacheOptions, api: HfApi, retrier: _Retrier, repo_id: str, commit: str, began: float
) -> tuple[dict[str, Any], int]:
    layout = CacheLayout(opts.cache_dir)
    files = _list_files(api, retrier, repo_id, commit)
    try:
        selection = select_files(files, opts.include, opts.exclude)
    except NoWeightsError as error:
        raise errors.NoWeights(f"{repo_id}@{commit}: {error}; vLLM cannot load it") from None
    if not selection.weights:
        raise errors.NoWeights(f"{repo_id}@{commit}: --exclude removed every weight file")
    blobs_dir = layout.repo_dir(repo_id) / "blobs"
    for stale in blobs_dir.glob("*.incomplete"):  # a killed run's partial files (we hold the lock)
        stale.unlink(missing_ok=True)
    _check_space(layout, blobs_dir, selection, repo_id, commit)
    present_before = {f.blob_name for f in selection.files if (blobs_dir / f.blob_name).exists()}

    journal = VerificationJournal(layout.state / "verified" / f"{repo_folder_name(repo_id)}--{commit}.json")
    fetcher = _Fetcher(opts, repo_id, commit, journal)
    monitor = progress.ProgressMonitor(
        blobs_dir,
        {f.blob_name: f.size for f in selection.files},
        stall_timeout=opts.stall_timeout,
        log_interval=opts.progress_interval,
        in_flight=fetcher.in_flight,
        abort_after=opts.abort_after if opts.abort_after is not None else 10 * opts.stall_timeout + 120,
        on_abort=lambda quiet: _abort_stalled(opts, repo_id, quiet),
    ).start()
    download_began = time.monotonic()
    try:
        fetcher.fetch_all(selection.metadata)  # small files first: the weight index decides the shards
        if selection.index_name:
            index_path = layout.snapshot_dir(repo_id, commit) / selection.index_name
            try:
                indexed = set(json.loads(index_path.read_text())["weight_map"].values())
                selection = restrict_to_index(selection, indexed, opts.include)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("could not read %s; taking every %s file", selection.index_name, selection.weight_format)
        fetcher.fetch_all(selection.weights)
    finally:
        monitor.stop()
    download_seconds = time.monotonic() - download_began
    downloaded = sum(f.size for f in selection.files if f.blob_name not in present_before)
    log.info("progress: %s", monitor.line())
    sync_began = time.monotonic()
    snapshot = layout.snapshot_dir(repo_id, commit)
    # Every selected file went through fetcher.fetch, which fsynced it; now the names: the links' folders
    # deepest first, then the folders holding snapshots/<commit> and blobs/.
    make_durable([*sorted({(snapshot / f.path).parent for f in selection.files}, key=lambda d: -len(d.parts)),
                  blobs_dir, snapshot.parent, blobs_dir.parent])  # fmt: skip
    sync_seconds = time.monotonic() - sync_began

    manifest: dict[str, Any] = {
        "formatVersion": FORMAT_VERSION,
        "repoId": repo_id,
        "commit": commit,
        "revisions": [] if is_commit(opts.revision) else [opts.revision],
        "weightFormat": selection.weight_format,
        "verified": True,
        "files": [
            {"path": f.path, "size": f.size, "sha256": fetcher.sha256[f.path], "lfs": f.sha256 is not None}
            for f in selection.files
        ],
        "fileCount": len(selection.files),
        "bytes": sum(f.size for f in selection.files),
        "downloadedBytes": downloaded,
        "completedAt": _utc_now(),
        "durationSeconds": round(time.monotonic() - began, 3),
        "downloadSeconds": round(download_seconds, 3),
        "verificationSeconds": round(fetcher.verification_seconds, 3),
        "syncSeconds": round(sync_seconds, 3),
        "sources": fetcher.sources.summary_fields(),
    }
    atomic_write_json(layout.manifest_path(repo_id, commit), manifest)
    journal.remove()
    rate = downloaded / download_seconds if download_seconds > 0 else 0.0
    log.info(
        "cached %s@%s: %d files, %s (%s downloaded in %.1f s, %s/s), verified in %.2f s, on the disk %.2f s later",
        repo_id, commit, manifest["fileCount"], units.human_bytes(manifest["bytes"]),
        units.human_bytes(downloaded), download_seconds, units.human_bytes(rate),
        fetcher.verification_seconds, sync_seconds,
    )
    return manifest, downloaded


def _abort_stalled(opts: CacheOptions, repo_id: str, quiet: float) -> None:
    """Last resort when a transfer hangs where no timeout sees it: report Stalled and exit at once."""
    message = (
        f"no byte of {repo_id} arrived for {quiet:.0f} s and the transfer did not time out; check the network "
        "path to HF_ENDPOINT, or raise --stall-timeout"
    )
    log.error("caching %s@%s failed: Stalled: %s", opts.model, opts.revision, message)
    result = summary.Summary(ok=False, command="cache", model=opts.model, revision=opts.revision,
                             reason="Stalled", message=message, retryable=True)
    print(result.to_json(), flush=True)
    if opts.termination_message_path:
        summary.write_termination_message(result, opts.termination_message_path)
    logging.shutdown()
    os._exit(summary.EXIT_RETRYABLE)  # worker threads may be stuck in a read: do not wait for them


def check_local_model(opts: CacheOptions, directory: Path) -> summary.Summary:
    """A local or pvc:// model: nothing to download; check it is something vLLM can load."""
    began = time.monotonic()
    if not directory.is_dir():
        raise errors.InvalidModel(f"{directory} is not a directory: check spec.model (pvc://<claim>/<path>)")
    config = directory / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError):
        raise errors.InvalidModel(
            f"{config} is missing or not JSON: point spec.model at the model's directory"
        ) from None
    files = [HubFile(p.name, p.stat().st_size, "", None) for p in directory.iterdir() if p.is_file()]
    try:
        selection = select_files(files, opts.include, opts.exclude)
    except NoWeightsError as error:
        raise errors.NoWeights(f"{directory}: {error}") from None
    total = sum(f.size for f in selection.files)
    log.info("%s is a local model (%s weights, %d files, %s); nothing to download", directory,
             selection.weight_format, len(selection.files), units.human_bytes(total))
    progress.COMPLETE.set(1)
    progress.CACHE_BYTES.set(total)
    progress.CACHE_FILES.set(len(selection.files))
    return summary.Summary(
        ok=True, command="cache", model=opts.model, revision=opts.revision, bytes=total,
        files=len(selection.files), verified=False, completedAt=_utc_now(),
        durationSeconds=round(time.monotonic() - began, 3),
        extra={"source": "local", "path": str(directory), "weightFormat": selection.weight_format},
    )


def _local_directory(model: str) -> Path | None:
    if model.startswith("pvc://"):
        return Path(parse_model(model).local_dir())
    if model.startswith(("/", "./", "../", "~")) or Path(model).is_dir():
        return Path(model).expanduser()
    return None


def run_cache(opts: CacheOptions) -> summary.Summary:
    """Run the whole cache step; never raises for expected failures (they become a failed Summary)."""
    disable_progress_bars()
    for noisy in ("httpx2", "httpx"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The HTTP read timeout is the stall detector inside a transfer (see progress.py).
    constants.HF_HUB_DOWNLOAD_TIMEOUT = max(int(opts.stall_timeout), 1)
    # Bodies go to the file as they arrive (httpx reads of 64 KiB): huggingface_hub's default re-chunking
    # into 10 MiB pieces copies every byte three more times, into fresh buffers the kernel must fault in,
    # which here cost about as much CPU as the rest of the download (bench/cache_bench.py). None is httpx's
    # "chunks as they come" (``iter_bytes(chunk_size=None)``); http_get is its only reader.
    setattr(constants, "DOWNLOAD_CHUNK_SIZE", None)  # noqa: B010 - typed int upstream; None is httpx's own value
    redactor = progress.install_redaction([opts.token] if opts.token else [])
    progress.COMPLETE.set(0)
    repo_id = opts.model
    try:
        try:
            local = _local_directory(opts.model)
            if local is not None:
                return check_local_model(opts, local)
            source = parse_model(opts.model)
        except ValueError as error:
            raise errors.InvalidModel(str(error)) from None
        assert source.repo_id is not None
        repo_id = source.repo_id
        problem = revision_problem(opts.revision)
        if problem is not None:  # before any request or path: refs/<revision> must stay inside the cache
            raise errors.InvalidRevision(
                f"spec.revision {opts.revision!r} is not a valid git ref name or 40-hex commit ({problem}): "
                "use a branch, a tag or a commit, e.g. 'main', 'v1.0' or the commit's full id"
            )
        return cache_hub_model(opts, repo_id)
    except Exception as error:  # noqa: BLE001 - every failure must end in a summary
        failure = classify(error, repo_id=repo_id, revision=opts.revision, has_token=bool(opts.token))
        if not isinstance(error, CacheError):
            log.debug("cache failure detail", exc_info=True)
        log.error("caching %s@%s failed: %s: %s", opts.model, opts.revision, failure.reason, failure.message)
        return summary.Summary(
            ok=False, command="cache", model=opts.model, revision=opts.revision,
            reason=failure.reason, message=failure.message, retryable=failure.retryable,
        )
    finally:
        progress.remove_redaction(redactor)


def exit_code(result: summary.Summary) -> int:
    if result.ok:
        return summary.EXIT_OK
    return summary.EXIT_RETRYABLE if result.retryable else summary.EXIT_PERMANENT


def _start_metrics_server(port: int) -> Callable[[], None] | None:
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, registry=progress.REGISTRY)
    except OSError as error:  # the port is taken: caching matters more than its metrics
        log.warning("cannot serve metrics on :%d (%s); caching without them", port, error)
        return None
    log.info("cache metrics on :%d/metrics", port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def plan_cached(result: summary.Summary, cache_dir: Path, plan_kwargs: dict[str, Any]) -> None:
    """Plan GPU memory from the files just cached (exact, and with the token's access) into ``result.extra["plan"]``.

    The operator reads it from the termination message when it could not plan from the Hub itself.
    A planner failure is reported in the plan (``fits`` None, ``error``); it never fails the cache.
    """
    from vllm_runtime.planner import plan_model

    if result.extra.get("path"):
        directory = Path(str(result.extra["path"]))
    else:
        directory = CacheLayout(cache_dir).snapshot_dir(result.model, str(result.commit))
    try:
        plan: dict[str, Any] = plan_model(str(directory), **plan_kwargs).summary()
    except Exception as error:  # noqa: BLE001 - the cache succeeded; the plan only informs
        log.warning("cannot plan GPU memory for %s: %s: %s", result.model, type(error).__name__, error)
        plan = {"fits": None, "error": f"{type(error).__name__}: {error}"[:500]}
    else:
        log.info("memory plan: %s", plan.get("reason"))
    result.extra["plan"] = plan
    # The termination message holds 4096 bytes: shed the plan's details before the plan itself.
    for shed in ("suggestions", "reason", "chosen"):
        if len(result.to_json().encode()) <= summary.MAX_TERMINATION_MESSAGE_BYTES - 64:
            return
        plan.pop(shed, None)
    if len(result.to_json().encode()) > summary.MAX_TERMINATION_MESSAGE_BYTES - 64:
        result.extra["plan"] = {"fits": plan.get("fits")}


def main(args: argparse.Namespace) -> int:
    try:
        plan_kwargs = plan_spec.plan_kwargs_from_args(args)
    except ValueError as error:
        print(f"cache: {error}", file=sys.stderr)
        return summary.EXIT_USAGE
    try:
        siblings = sibling_urls(args.sibling, os.environ.get(SIBLINGS_ENV))
    except SiblingURLError as error:
        print(f"cache: {error}", file=sys.stderr)
        return summary.EXIT_USAGE
    adapters = None
    if getattr(args, "adapters_file", None) is not None:
        from vllm_runtime.adapters import caching as adapter_cache
        from vllm_runtime.adapters.desired import AdaptersFileError

        try:
            adapters = adapter_cache.read_entries(Path(args.adapters_file))
        except AdaptersFileError as error:
            print(f"cache: --adapters-file {error}", file=sys.stderr)
            return summary.EXIT_USAGE
    opts = CacheOptions(
        model=args.model,
        cache_dir=Path(args.cache_dir),
        revision=args.revision,
        include=args.include,
        exclude=args.exclude,
        stall_timeout=args.stall_timeout,
        retries=args.retries,
        retry_backoff=args.retry_backoff,
        max_workers=args.max_workers,
        lock_timeout=args.lock_timeout,
        progress_interval=args.progress_interval,
        verify_existing=args.verify_existing,
        termination_message_path=args.termination_message_path,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        token=(os.environ.get("HF_TOKEN") or "").strip() or None,
        siblings=siblings,
        sibling_timeout=args.sibling_timeout,
    )
    stop_metrics = _start_metrics_server(args.metrics_port) if args.metrics_port else None
    try:
        result = run_cache(opts)
        if result.ok and adapters is not None:  # after the base model; its outcome stays the summary's
            result.extra["adapters"] = adapter_cache.cache_adapters(opts, adapters)
            progress.COMPLETE.set(1)
            progress.CACHE_BYTES.set(result.bytes or 0)
            progress.CACHE_FILES.set(result.files or 0)
    finally:
        if stop_metrics is not None:
            stop_metrics()
    if result.ok and not result.extra.get("path"):  # an adapter repo cached as a model: its rank etc.
        from vllm_runtime.adapters.caching import describe_cached

        describe_cached(result, opts.cache_dir)
    if result.ok and plan_kwargs is not None:
        plan_cached(result, opts.cache_dir, plan_kwargs)
    if adapters is not None:
        adapter_cache.fit_summary(result)
    if opts.token and result.message:  # our messages never contain it; this guards against future ones
        result.message = result.message.replace(opts.token, "***")
    print(result.to_json(), flush=True)
    summary.write_termination_message(result, args.termination_message_path)
    return exit_code(result)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="pre-cache a pinned, sha256-verified model onto the cache volume",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model", required=True, help="org/name, pvc://<claim>/<path>, or a local directory")
    parser.add_argument("--revision", default="main", help="branch, tag or 40-hex commit (default: main)")
    parser.add_argument("--cache-dir", required=True, help="the cache volume's mount (HF_HUB_CACHE is <dir>/hub)")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN",
                        help="also download repo files matching this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="do not download files matching this pattern (repeatable)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds without a byte before a transfer counts as stalled (default: 60)")
    parser.add_argument("--retries", type=int, default=4, help="retries of a failing transfer (default: 4)")
    parser.add_argument("--retry-backoff", type=float, default=2.0,
                        help="first backoff in seconds, doubled per retry (default: 2)")
    parser.add_argument("--max-workers", type=int, default=8, help="files downloaded at once (default: 8)")
    parser.add_argument("--lock-timeout", type=float, default=6 * 3600.0,
                        help="seconds to wait for another process caching the same commit (default: 6 h)")
    parser.add_argument("--progress-interval", type=float, default=10.0,
                        help="seconds between progress log lines (default: 10)")
    parser.add_argument("--verify-existing", action="store_true",
                        help="re-hash an already cached commit before reusing it (a corrupt file is fetched again)")
    parser.add_argument("--adapters-file", metavar="PATH",
                        help="also cache the LoRA adapters this JSON/YAML file lists ({\"adapters\": [{name, model, "
                        "revision}]}), each after the base model, pinned and verified like it (docs/adapters.md)")
    parser.add_argument("--sibling", action="append", default=[], metavar="URL",
                        help="a peer replica's sibling server (http://host:8090; repeatable; also "
                        f"${SIBLINGS_ENV}, comma separated): file bytes come from a sibling, the file list and "
                        "sha256 from the Hub; every file is verified, a failing sibling falls back to the next or "
                        "the Hub; the token is never sent to a sibling")
    parser.add_argument("--sibling-timeout", type=float, default=10.0,
                        help="seconds to connect to a sibling and without a byte from it (default: 10)")
    plan_spec.add_plan_arguments(parser)
    parser.add_argument("--termination-message-path", default=TERMINATION_MESSAGE_PATH,
                        help=f"where the one-line JSON summary goes (default: {TERMINATION_MESSAGE_PATH})")
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value when absent here.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (default: INFO)")
    parser.set_defaults(func=main)
