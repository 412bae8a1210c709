"""Cache management: ``vllm-runtime ls``, ``rm`` and ``gc`` on a cache volume.

- ``ls --cache-dir D [--json]``: every cached commit (model, commit, revisions that led to it, size,
  files, completed, last used, in use by), plus snapshots without a manifest (``complete: false``:
  being cached, or left by a killed run).
- ``rm --cache-dir D --model M [--revision C] [--force]``: remove one commit (or every commit of M).
  The manifest goes first, so a crash midway never leaves a commit that looks complete; blobs shared
  with other commits stay. A commit in use (see below) is refused without ``--force``.
- ``gc --cache-dir D --max-size SIZE [--dry-run]``: first remove what failed or killed caches left
  (``find_leftovers``: snapshots without a manifest, partial downloads, orphan blobs, temporary files),
  then evict least-recently-used commits that are not in use until the blobs on the volume fit ``SIZE``
  (``10Gi``, ``500MB``, a whole number of bytes).
- The cache command calls ``make_room`` before a download the volume cannot hold: the same LRU eviction
  of commits no server uses, just until the new commit fits.

"In use" and "last used" are defined in ``vllm_runtime.cache.usage``: ``vllm-runtime serve`` calls
``mark_in_use(cache_dir, repo_id, commit)`` when it starts and at least every
``LEASE_TTL_SECONDS / 3`` seconds while serving (``release`` when it stops). A lease not renewed for
``LEASE_TTL_SECONDS`` (600 s) is stale and no longer protects the commit. The cache command and
``mark_in_use`` both touch the commit's last-used time, which orders ``gc``'s evictions.
Removal holds the commit's cache lock while it checks the leases and removes, so it never races a cache
run of the same commit, nor a server taking its first lease (``usage.lease_if_complete`` takes that lock).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

from vllm_runtime import summary, units
from vllm_runtime.cache.manifest import list_manifests
from vllm_runtime.cache.usage import (
    LEASE_TTL_SECONDS,
    in_use_by,
    last_used,
    mark_in_use,
    release,
)
from vllm_runtime.layout import CacheLayout, is_commit, parse_model, repo_folder_name
from vllm_runtime.units import human_bytes

__all__ = [
    "CachedCommit", "Leftover", "find_leftovers", "gc", "list_cache", "make_room", "mark_in_use", "parse_size",
    "register", "release", "remove",
]

log = logging.getLogger(__name__)

# Partial downloads and temporary files younger than this may belong to a live run: gc leaves them.
LEFTOVER_MIN_AGE_SECONDS = 3600.0


def parse_size(text: str) -> int:
    """``units.parse_size`` for argparse: a bad size becomes a usage error that names the forms."""
    try:
        return units.parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_seconds(text: str) -> float:
    """A duration in seconds that must be > 0 (a lease TTL of 0 would make every serving pod's lease stale)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


@dataclass
class CachedCommit:
    repo_id: str
    commit: str
    complete: bool
    revisions: list[str] = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    completed_at: str | None = None
    last_used: str | None = None
    in_use_by: list[str] = field(default_factory=list)
    weight_format: str | None = None
    adapter: bool = False  # a LoRA adapter (adapter_config.json at the top level), listed and leased like a model
    lora_rank: int | None = None  # an adapter's largest rank, from its adapter_config.json
    _last_used_ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_last_used_ts")
        return data


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_iso(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def list_cache(cache_dir: str | Path, lease_ttl: float = LEASE_TTL_SECONDS) -> list[CachedCommit]:
    """Every commit on the volume: complete ones from manifests, then incomplete snapshots."""
    layout = CacheLayout(Path(cache_dir))
    found: list[CachedCommit] = []
    seen: set[tuple[str, str]] = set()
    now = time.time()
    for manifest in list_manifests(cache_dir):
        repo_id, commit = str(manifest["repoId"]), str(manifest["commit"])
        used = last_used(cache_dir, repo_id, commit) or _parse_iso(manifest.get("completedAt"))
        adapter, rank = _adapter_facts(layout, manifest)
        found.append(
            CachedCommit(
                repo_id=repo_id, commit=commit, complete=True, revisions=list(manifest.get("revisions", [])),
                bytes=int(manifest.get("bytes", 0)), files=int(manifest.get("fileCount", 0)),
                completed_at=manifest.get("completedAt"), last_used=_iso(used),
                in_use_by=in_use_by(cache_dir, repo_id, commit, lease_ttl, now),
                weight_format=manifest.get("weightFormat"), adapter=adapter, lora_rank=rank, _last_used_ts=used,
            )
        )
        seen.add((repo_id, commit))
    # Snapshots with no manifest; the repo id is recovered from the folder name (models--org--name).
    for snapshot in sorted(layout.hub_cache.glob("models--*/snapshots/*")):
        parts = snapshot.parent.parent.name.split("--")
        if len(parts) != 3 or not is_commit(snapshot.name):
            continue
        repo_id = f"{parts[1]}/{parts[2]}"
        if (repo_id, snapshot.name) in seen:
            continue
        files = [p for p in snapshot.rglob("*") if p.is_file()]
        found.append(
            CachedCommit(
                repo_id=repo_id, commit=snapshot.name, complete=False, bytes=sum(p.stat().st_size for p in files),
                files=len(files), in_use_by=in_use_by(cache_dir, repo_id, snapshot.name, lease_ttl, now),
            )
        )
    return sorted(found, key=lambda c: (c.repo_id, c.completed_at or "", c.commit))


def _adapter_facts(layout: CacheLayout, manifest: dict[str, Any]) -> tuple[bool, int | None]:
    """(is a LoRA adapter, its rank): adapter_config.json in the manifest; the rank from that small file."""
    if not any(f.get("path") == "adapter_config.json" for f in manifest.get("files", [])):
        return False, None
    try:
        config = json.loads(
            (layout.snapshot_dir(str(manifest["repoId"]), str(manifest["commit"])) / "adapter_config.json").read_text()
        )
    except (OSError, ValueError):
        return True, None
    from vllm_runtime.adapters.checks import rank_of  # the same rank the converger and the cache report

    return True, rank_of(config) if isinstance(config, dict) else None


def _blob_refs(layout: CacheLayout) -> dict[Path, set[tuple[str, str]]]:
    """Blob path -> the (repo folder, commit) snapshots linking to it."""
    refs: dict[Path, set[tuple[str, str]]] = {}
    for snapshot in layout.hub_cache.glob("models--*/snapshots/*"):
        for link in snapshot.rglob("*"):
            if link.is_symlink() or link.is_file():
                refs.setdefault(link.resolve(), set()).add((snapshot.parent.parent.name, snapshot.name))
    return refs


def cache_size(cache_dir: str | Path) -> int:
    """Bytes of every blob on the volume (what gc bounds); shared blobs count once."""
    layout = CacheLayout(Path(cache_dir))
    return sum(p.stat().st_size for p in layout.hub_cache.glob("models--*/blobs/*") if p.is_file())


def _remove_commit(layout: CacheLayout, repo_id: str, commit: str) -> int:
    """Delete one commit; returns the bytes freed. The caller holds the commit's lock."""
    folder = repo_folder_name(repo_id)
    layout.manifest_path(repo_id, commit).unlink(missing_ok=True)  # first: never "complete" while half gone
    repo_dir = layout.repo_dir(repo_id)
    snapshot = repo_dir / "snapshots" / commit
    refs = _blob_refs(layout)
    freed = 0
    if snapshot.exists():
        own = {link.resolve() for link in snapshot.rglob("*") if link.is_symlink() or link.is_file()}
        for blob in own:
            if refs.get(blob, set()) <= {(folder, commit)} and blob.parent.name == "blobs" and blob.exists():
                freed += blob.stat().st_size
                blob.unlink()
        shutil.rmtree(snapshot, ignore_errors=True)
    for ref in (repo_dir / "refs").rglob("*"):
        if ref.is_file() and ref.read_text().strip() == commit:
            ref.unlink()
    for leftover in (
        repo_dir / "trees" / f"{commit}.json",
        layout.state / "verified" / f"{folder}--{commit}.json",
        layout.state / "last-used" / f"{folder}--{commit}",
    ):
        leftover.unlink(missing_ok=True)
    snapshots_left = (repo_dir / "snapshots").exists() and any((repo_dir / "snapshots").iterdir())
    if not snapshots_left:
        shutil.rmtree(repo_dir, ignore_errors=True)
        shutil.rmtree(layout.manifests / folder, ignore_errors=True)
    return freed


def remove(
    cache_dir: str | Path, repo_id: str, commit: str | None = None, *, force: bool = False,
    lease_ttl: float = LEASE_TTL_SECONDS, lock_timeout: float = 10.0,
) -> list[tuple[str, int]]:
    """Remove one commit (or all of ``repo_id``); returns (commit, bytes freed) pairs.

    Raises LookupError when nothing matches, PermissionError when a commit is in use (without force),
    TimeoutError when a cache run holds the commit's lock.
    """
    layout = CacheLayout(Path(cache_dir))
    commits = sorted({c.commit for c in list_cache(cache_dir, lease_ttl) if c.repo_id == repo_id
                      and commit in (None, c.commit)})
    if not commits:
        raise LookupError(f"{repo_id}{'@' + commit if commit else ''} is not in the cache at {cache_dir}")
    with ExitStack() as locks:
        # Every target's lock first (sorted: no deadlock with another rm), then the lease check, then the
        # removal: serve takes its first lease under the same lock (usage.lease_if_complete), so no lease
        # can appear between the check and the removal.
        for target in commits:
            lock_path = layout.lock_path(repo_id, target)
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                locks.enter_context(filelock.FileLock(str(lock_path), timeout=lock_timeout))
            except filelock.Timeout:
                raise TimeoutError(f"a cache run is working on {repo_id}@{target}; try again later") from None
        now = time.time()
        busy = {c: holders for c in commits if (holders := in_use_by(cache_dir, repo_id, c, lease_ttl, now))}
        if busy and not force:
            described = ", ".join(f"{c[:12]} by {', '.join(h)}" for c, h in busy.items())
            raise PermissionError(f"in use: {described}; stop those pods first, or pass --force")
        # The lock files stay: deleting one could let a waiter and a newcomer hold "the" lock at once.
        return [(target, _remove_commit(layout, repo_id, target)) for target in commits]


def _eviction_candidates(
    cache_dir: str | Path, lease_ttl: float, keep: tuple[str, str] | None = None
) -> list[CachedCommit]:
    """Complete commits no server holds a lease on, least recently used first."""
    return sorted(
        (c for c in list_cache(cache_dir, lease_ttl) if c.complete and not c.in_use_by and (c.repo_id, c.commit) != keep),
        key=lambda c: c._last_used_ts,
    )


def _evict(cache_dir: str | Path, candidate: CachedCommit, lease_ttl: float, lock_timeout: float) -> int | None:
    """Remove one candidate; None when it became busy or in use meanwhile (checked again under its lock)."""
    try:
        return sum(b for _, b in remove(cache_dir, candidate.repo_id, candidate.commit, lease_ttl=lease_ttl,
                                        lock_timeout=lock_timeout))
    except (TimeoutError, PermissionError, LookupError) as error:
        log.warning("not evicting %s@%s: %s", candidate.repo_id, candidate.commit, error)
        return None


def gc(
    cache_dir: str | Path, max_size: int, *, dry_run: bool = False, lease_ttl: float = LEASE_TTL_SECONDS
) -> tuple[list[CachedCommit], int]:
    """Evict least-recently-used complete commits not in use until the blobs fit ``max_size``.

    Returns the evicted commits and the size after eviction (an estimate when ``dry_run``).
    """
    size = cache_size(cache_dir)
    evicted: list[CachedCommit] = []
    for candidate in _eviction_candidates(cache_dir, lease_ttl):
        if size <= max_size:
            break
        if dry_run:
            size -= candidate.bytes
        else:
            freed = _evict(cache_dir, candidate, lease_ttl, lock_timeout=10.0)
            if freed is None:
                continue
            size -= freed
        evicted.append(candidate)
    return evicted, max(size, 0)


def make_room(
    cache_dir: str | Path, *, needed: Callable[[], int], free: Callable[[], int], keep: tuple[str, str],
    lease_ttl: float = LEASE_TTL_SECONDS, lock_timeout: float = 5.0,
) -> list[CachedCommit]:
    """Evict commits no server uses, least recently used first, until ``needed() <= free()``.

    The cache command calls this before downloading ``keep`` (repo id, commit) when the volume is short,
    so a revision change replaces the old commits instead of failing with InsufficientSpace. Both
    callables are re-evaluated after every eviction: blobs shared with an evicted commit may have to be
    fetched again. Returns what was evicted (possibly not enough; the caller re-checks).
    """
    evicted: list[CachedCommit] = []
    if needed() <= free():
        return evicted
    for candidate in _eviction_candidates(cache_dir, lease_ttl, keep=keep):
        if needed() <= free():
            break
        if _evict(cache_dir, candidate, lease_ttl, lock_timeout) is not None:
            log.info("evicted %s@%s (%s, last used %s) to make room for %s@%s", candidate.repo_id,
                     candidate.commit, human_bytes(candidate.bytes), candidate.last_used, *keep)
            evicted.append(candidate)
    return evicted


@dataclass(frozen=True)
class Leftover:
    path: Path
    bytes: int
    why: str


def _size_of(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _older_than(path: Path, seconds: float, now: float) -> bool:
    try:
        return now - path.lstat().st_mtime >= seconds
    except OSError:
        return False


@contextmanager
def _all_free(lock_paths: list[Path]) -> Iterator[bool]:
    """Hold every lock at once without waiting; yields False (holding none) when any is taken."""
    with ExitStack() as held:
        for path in sorted(lock_paths):
            try:
                held.enter_context(filelock.FileLock(str(path), timeout=0))
            except filelock.Timeout:
                held.close()
                yield False
                return
        yield True


def find_leftovers(
    cache_dir: str | Path, *, lease_ttl: float = LEASE_TTL_SECONDS, min_age: float = LEFTOVER_MIN_AGE_SECONDS,
    remove_them: bool = False,
) -> list[Leftover]:
    """What failed or killed caches left behind (and remove it with ``remove_them``).

    - a snapshot without a manifest whose commit lock is free and that no server leases (a killed or
      failed cache; a running one holds the lock), with its verification journal and blobs only it uses;
    - per repo, when no cache of any of its commits holds a lock: partial downloads (``blobs/*.incomplete``)
      and blobs no snapshot links to;
    - temporary files of interrupted atomic writes (``.*.tmp`` under manifests/, state/ and refs/).

    Partial downloads and temporary files must also be ``min_age`` seconds old (default an hour): a
    download in progress keeps its file's mtime fresh, and an atomic write lasts milliseconds.
    """
    layout = CacheLayout(Path(cache_dir))
    now = time.time()
    found: list[Leftover] = []
    for entry in list_cache(cache_dir, lease_ttl):
        if entry.complete or entry.in_use_by:
            continue
        lock_path = layout.lock_path(entry.repo_id, entry.commit)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with _all_free([lock_path]) as free:
            if not free:
                continue  # a cache run is downloading it right now
            snapshot = layout.snapshot_dir(entry.repo_id, entry.commit)
            size = entry.bytes
            if remove_them:
                size = _remove_commit(layout, entry.repo_id, entry.commit)
            found.append(Leftover(snapshot, size, "incomplete snapshot (no manifest)"))
    for repo_dir in sorted(layout.hub_cache.glob("models--*")):
        locks = sorted(layout.locks.glob(f"{repo_dir.name}--*.lock")) if layout.locks.is_dir() else []
        with _all_free(locks) as free:
            if not free:
                continue
            linked = set(_blob_refs(layout))
            for blob in sorted((repo_dir / "blobs").glob("*")):
                if blob.name.endswith(".incomplete"):
                    why = "partial download"
                elif blob.resolve() not in linked:
                    why = "blob no snapshot uses"
                else:
                    continue
                if not _older_than(blob, min_age, now):
                    continue
                found.append(Leftover(blob, _size_of(blob), why))
                if remove_them:
                    blob.unlink(missing_ok=True)
    temporaries = [
        tmp
        for root in (layout.manifests, layout.state, *layout.hub_cache.glob("models--*/refs"))
        for tmp in sorted(root.rglob(".*.tmp"))
    ]
    for tmp in temporaries:
        if _older_than(tmp, min_age, now):
            found.append(Leftover(tmp, _size_of(tmp), "temporary file of an interrupted write"))
            if remove_them:
                tmp.unlink(missing_ok=True)
    return found


def _cmd_ls(args: argparse.Namespace) -> int:
    entries = list_cache(args.cache_dir, args.lease_ttl)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=1))
        return summary.EXIT_OK
    if not entries:
        print(f"no models cached in {args.cache_dir}")
        return summary.EXIT_OK
    rows = [("MODEL", "KIND", "COMMIT", "REVISIONS", "SIZE", "FILES", "LAST USED", "IN USE", "STATE")]
    for e in entries:
        kind = (f"adapter(r={e.lora_rank})" if e.lora_rank else "adapter") if e.adapter else "model"
        rows.append((
            e.repo_id, kind, e.commit[:12], ",".join(e.revisions) or "-", human_bytes(e.bytes), str(e.files),
            e.last_used or "-", ",".join(e.in_use_by) or "-", "complete" if e.complete else "incomplete",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"total on volume: {human_bytes(cache_size(args.cache_dir))}")
    return summary.EXIT_OK


def _cmd_rm(args: argparse.Namespace) -> int:
    try:
        source = parse_model(args.model)
        if source.repo_id is None:
            raise ValueError(f"{args.model} is a volume path, not a cached Hub model")
        if args.revision and not is_commit(args.revision):
            raise ValueError(f"--revision must be a 40-hex commit (see `vllm-runtime ls`), got {args.revision!r}")
        removed = remove(args.cache_dir, source.repo_id, args.revision, force=args.force, lease_ttl=args.lease_ttl)
    except (ValueError, LookupError, PermissionError) as error:
        print(f"rm: {error}", file=sys.stderr)
        return summary.EXIT_PERMANENT
    except TimeoutError as error:
        print(f"rm: {error}", file=sys.stderr)
        return summary.EXIT_RETRYABLE
    for commit, freed in removed:
        print(f"removed {args.model}@{commit} (freed {human_bytes(freed)})")
    return summary.EXIT_OK


def _cmd_gc(args: argparse.Namespace) -> int:
    verb = "would remove" if args.dry_run else "removed"
    for leftover in find_leftovers(args.cache_dir, lease_ttl=args.lease_ttl, remove_them=not args.dry_run):
        print(f"{verb} {leftover.why}: {leftover.path} ({human_bytes(leftover.bytes)})")
    before = cache_size(args.cache_dir)
    evicted, after = gc(args.cache_dir, args.max_size, dry_run=args.dry_run, lease_ttl=args.lease_ttl)
    verb = "would evict" if args.dry_run else "evicted"
    for e in evicted:
        print(f"{verb} {e.repo_id}@{e.commit} ({human_bytes(e.bytes)}, last used {e.last_used})")
    print(f"cache: {human_bytes(before)} -> {human_bytes(after)} (bound {human_bytes(args.max_size)})")
    if after > args.max_size:
        print("gc: the commits left are in use or busy; the cache still exceeds --max-size", file=sys.stderr)
        return summary.EXIT_RETRYABLE
    return summary.EXIT_OK


def register(subparsers: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", required=True, help="the cache volume's mount")
        p.add_argument("--lease-ttl", type=positive_seconds, default=LEASE_TTL_SECONDS,
                       help=f"seconds a serve lease stays fresh (default: {LEASE_TTL_SECONDS:.0f})")

    ls = subparsers.add_parser("ls", help="list cached models and commits")
    common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_cmd_ls)

    rm = subparsers.add_parser("rm", help="remove a cached commit (or all commits of a model)")
    common(rm)
    rm.add_argument("--model", required=True, help="org/name")
    rm.add_argument("--revision", help="the 40-hex commit to remove (default: every commit of the model)")
    rm.add_argument("--force", action="store_true", help="remove even if a serving pod holds a lease")
    rm.set_defaults(func=_cmd_rm)

    gc_parser = subparsers.add_parser(
        "gc", help="remove what failed caches left, then evict least-recently-used commits not in use"
    )
    common(gc_parser)
    gc_parser.add_argument("--max-size", required=True, type=parse_size, help="bound, e.g. 100Gi")
    gc_parser.add_argument("--dry-run", action="store_true", help="only print what would be evicted")
    gc_parser.set_defaults(func=_cmd_gc)
