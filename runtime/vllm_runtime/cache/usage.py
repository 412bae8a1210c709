"""Which cached commits are in use, and when each was last used (for ``ls`` and ``gc``).

- Last use: ``<cache>/state/last-used/models--org--name--<commit>`` is touched (mtime) whenever the cache
  command completes or reuses a commit and whenever ``mark_in_use`` runs.
- In use: a lease ``<cache>/state/leases/models--org--name--<commit>--<holder>.lease`` (JSON: holder, pid,
  renewedAt). ``vllm-runtime serve`` calls ``lease_if_complete`` at start (under the commit's lock, like ``rm``
  and ``gc``), ``mark_in_use(cache_dir, repo_id, commit)`` at least every ``LEASE_TTL_SECONDS / 3`` while it
  serves, and ``release`` when it stops. A lease whose
  file was not touched for ``LEASE_TTL_SECONDS`` is stale (its pod died without releasing it): the commit
  counts as not in use. ``gc`` never evicts a commit with a fresh lease; ``rm`` refuses it without --force.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import filelock

from vllm_runtime.cache.manifest import read_manifest
from vllm_runtime.layout import CacheLayout, repo_folder_name

LEASE_TTL_SECONDS = 600.0


def _key(repo_id: str, commit: str) -> str:
    return f"{repo_folder_name(repo_id)}--{commit}"


def _holder(holder: str | None) -> str:
    name = holder or os.environ.get("HOSTNAME") or socket.gethostname() or "local"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def touch_last_used(cache_dir: str | Path, repo_id: str, commit: str) -> None:
    path = CacheLayout(Path(cache_dir)).state / "last-used" / _key(repo_id, commit)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path)
    except OSError:
        pass  # a read-only volume: last use is only a hint for gc


def last_used(cache_dir: str | Path, repo_id: str, commit: str) -> float | None:
    layout = CacheLayout(Path(cache_dir))
    times: list[float] = []
    for path in [layout.state / "last-used" / _key(repo_id, commit), *_lease_files(layout, repo_id, commit)]:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times) if times else None


def mark_in_use(cache_dir: str | Path, repo_id: str, commit: str, holder: str | None = None) -> Path:
    """Take or renew the lease of ``holder`` (default: this pod's hostname) on a cached commit."""
    layout = CacheLayout(Path(cache_dir))
    path = layout.state / "leases" / f"{_key(repo_id, commit)}--{_holder(holder)}.lease"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"holder": _holder(holder), "pid": os.getpid(), "renewedAt": now}) + "\n")
    os.replace(tmp, path)
    touch_last_used(cache_dir, repo_id, commit)
    return path


def lease_if_complete(
    cache_dir: str | Path, repo_id: str, commit: str, holder: str | None = None, *, lock_timeout: float = 60.0
) -> bool:
    """Take the first lease on a commit only while it is complete; False when its manifest is gone.

    Done under the commit's lock, the same lock ``rm``/``gc`` hold while they check leases and remove:
    either the removal finishes first (then the manifest is gone and this returns False), or the lease
    is written first (then the removal sees it). Raises ``filelock.Timeout`` when the lock stays busy.
    """
    lock_path = CacheLayout(Path(cache_dir)).lock_path(repo_id, commit)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(lock_path), timeout=lock_timeout):
        if read_manifest(cache_dir, repo_id, commit) is None:
            return False
        mark_in_use(cache_dir, repo_id, commit, holder)
        return True


def release(cache_dir: str | Path, repo_id: str, commit: str, holder: str | None = None) -> None:
    layout = CacheLayout(Path(cache_dir))
    (layout.state / "leases" / f"{_key(repo_id, commit)}--{_holder(holder)}.lease").unlink(missing_ok=True)


def _lease_files(layout: CacheLayout, repo_id: str, commit: str) -> list[Path]:
    return sorted((layout.state / "leases").glob(f"{_key(repo_id, commit)}--*.lease"))


def in_use_by(
    cache_dir: str | Path, repo_id: str, commit: str, ttl: float = LEASE_TTL_SECONDS, now: float | None = None
) -> list[str]:
    """Holders with a fresh lease on the commit (empty: not in use)."""
    layout = CacheLayout(Path(cache_dir))
    now = time.time() if now is None else now
    holders: list[str] = []
    prefix = f"{_key(repo_id, commit)}--"
    for path in _lease_files(layout, repo_id, commit):
        try:
            if now - path.stat().st_mtime <= ttl:
                holders.append(path.name[len(prefix) : -len(".lease")])
        except OSError:
            continue
    return holders
