"""Completion manifests: the only proof that a commit is cached and verified.

``<cache>/manifests/models--org--name/<commit>.json`` (see ``layout``), written last, atomically
(temporary file, fsync, rename, fsync of the directory). Its fields::

    {"formatVersion": 1, "repoId": "org/name", "commit": "<40 hex>", "revisions": ["main"],
     "weightFormat": "safetensors", "verified": true,
     "files": [{"path": "config.json", "size": 570, "sha256": "...", "lfs": false}, ...],
     "fileCount": 7, "bytes": 123456, "downloadedBytes": 123456,
     "completedAt": "2026-11-27T21:00:00Z", "durationSeconds": 3.2,
     "downloadSeconds": 2.9, "verificationSeconds": 0.4}

``bytes``/``fileCount`` cover the cached files; ``downloadedBytes`` what this run fetched; ``syncSeconds``
the final flush (``durable.make_durable``; each file was fsynced as it was fetched) before the manifest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vllm_runtime.layout import CacheLayout, is_commit, repo_folder_name

FORMAT_VERSION = 1


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, even after kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_manifest(cache_dir: str | Path, repo_id: str, commit: str) -> dict[str, Any] | None:
    """The completion manifest of ``repo_id`` at ``commit``, or None when that commit is not cached."""
    path = CacheLayout(Path(cache_dir)).manifest_path(repo_id, commit)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("commit") != commit or not data.get("verified"):
        return None
    return data


def snapshot_matches(cache_dir: str | Path, manifest: dict[str, Any]) -> bool:
    """Cheap warm check: every manifest file is in the snapshot with its size (no hashing, no network)."""
    snapshot = CacheLayout(Path(cache_dir)).snapshot_dir(manifest["repoId"], manifest["commit"])
    for entry in manifest.get("files", []):
        try:
            if (snapshot / entry["path"]).stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
    return True


def local_ref(cache_dir: str | Path, repo_id: str, revision: str) -> str | None:
    """The commit huggingface_hub's ``refs/<revision>`` file records for a branch or tag, if any."""
    ref = CacheLayout(Path(cache_dir)).repo_dir(repo_id) / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if is_commit(commit) else None


def list_manifests(cache_dir: str | Path) -> list[dict[str, Any]]:
    """Every valid manifest in the cache (any repo, any commit)."""
    root = CacheLayout(Path(cache_dir)).manifests
    found: list[dict[str, Any]] = []
    for path in sorted(root.glob("models--*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("verified") and path.stem == data.get("commit"):
            if repo_folder_name(str(data.get("repoId", ""))) == path.parent.name:
                found.append(data)
    return found


def find_complete_commit(cache_dir: str | Path, repo_id: str, revision: str) -> str | None:
    """The cached, verified commit for ``revision`` with no network: a commit itself, the branch/tag's
    ``refs`` file, or else the newest manifest that was cached for that revision name. The snapshot
    must still hold the manifest's files (sizes checked, no hashing)."""

    def complete(commit: str) -> bool:
        manifest = read_manifest(cache_dir, repo_id, commit)
        return manifest is not None and snapshot_matches(cache_dir, manifest)

    if is_commit(revision):
        return revision if complete(revision) else None
    ref = local_ref(cache_dir, repo_id, revision)
    if ref and complete(ref):
        return ref
    candidates = [
        m for m in list_manifests(cache_dir)
        if m.get("repoId") == repo_id and revision in m.get("revisions", []) and snapshot_matches(cache_dir, m)
    ]
    if not candidates:
        return None
    return str(max(candidates, key=lambda m: str(m.get("completedAt", "")))["commit"])
