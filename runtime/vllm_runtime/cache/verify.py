"""sha256 verification of cached files against the tree listing, with a journal for resumed runs.

Every file is checked against what the Hub publishes for it: the LFS sha256 for LFS files (all
weights), the git blob id (sha1 of ``blob <size>\\0<content>``) for small files. Both come out of
one read (the git id only for non-LFS files). The sha256 goes into the manifest for every file.

The journal (``<cache>/state/verified/models--org--name--<commit>.json``) remembers files already
verified (blob, size, mtime, sha256), so a run restarted after ``kill -9`` neither fetches nor
re-hashes them. It is only a shortcut for this volume's own earlier work; the manifest is the proof.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from vllm_runtime.cache.manifest import atomic_write_json
from vllm_runtime.cache.selection import HubFile

READ_SIZE = 8 * 1024 * 1024


def file_digests(path: Path, *, git_oid: bool = True) -> tuple[str, str | None]:
    """(sha256, git blob sha1 or None) of a file, in one pass.

    An LFS file's git oid is that of its pointer, not of its content, so callers skip it for LFS files.
    """
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode()) if git_oid else None  # noqa: S324 - git's id, not security
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


def verify_file(hub_file: HubFile, path: Path) -> tuple[bool, str]:
    """(matches what the Hub published, sha256 of the file)."""
    sha256, git_oid = file_digests(path, git_oid=hub_file.sha256 is None)
    if path.stat().st_size != hub_file.size:
        return False, sha256
    expected_ok = sha256 == hub_file.sha256 if hub_file.sha256 else git_oid == hub_file.git_oid
    return expected_ok, sha256
