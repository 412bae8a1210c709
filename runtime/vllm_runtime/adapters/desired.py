"""The desired adapter set: the file the operator mounts (a ConfigMap key) and ``serve --adapters-file`` reads.

Format (JSON, or the same structure in YAML)::

    {"adapters": [
      {"name": "sql", "model": "org/sql-lora", "commit": "<40 hex>", "revision": "main"},
      {"name": "chat", "model": "pvc://loras/chat"}
    ]}

- ``name``: what clients put in the OpenAI ``model`` field; unique, not a served name of the base model.
- ``model``: a Hugging Face repo id (served from the verified cache: ``commit`` is required, the operator
  resolves ``revision`` once) or ``pvc://claim/path`` (a directory on a mounted claim; ``commit`` optional).
- ``revision``: informational (the name the commit was resolved from).

A top-level list (without ``{"adapters": ...}``) is accepted too. A broken entry fails alone (its state says
why); a file that cannot be read or parsed leaves the last good set in place (a ConfigMap volume swaps a
symlink, so a reader never sees half a file, but a person editing a hostPath might).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vllm_runtime import layout

# The CRD's rule for spec.adapters[].name (crds/vllmmodel.yaml): what clients put in the OpenAI "model" field;
# vLLM takes any lora_name, so the runtime accepts whatever the CRD lets through (a repo-like "org/name" too).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9._:/]{0,127}$")


@dataclass(frozen=True)
class DesiredAdapter:
    name: str
    model: str
    commit: str | None = None
    revision: str | None = None
    problem: str | None = None  # why this entry cannot be used (InvalidAdapter), None when it can

    @property
    def is_hub(self) -> bool:
        return not self.model.startswith(("pvc://", "/"))

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What identifies the files to load: a change of model or commit means a reload."""
        return self.name, self.model, self.commit


class AdaptersFileError(ValueError):
    """The adapters file as a whole cannot be used; ``path`` names it, the message says what to fix."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def parse_adapters(
    data: Any, *, path: str, served_names: tuple[str, ...] = (), require_commit: bool = True
) -> list[DesiredAdapter]:
    """Entries in file order; broken entries carry ``problem`` (the others still load).

    ``require_commit``: serve needs each Hub adapter's 40-hex commit; the cache command resolves
    ``revision`` (default ``main``) itself and takes a given commit as the revision."""
    if data is None:
        return []
    if isinstance(data, dict):
        data = data.get("adapters", [])
    if not isinstance(data, list):
        raise AdaptersFileError(path, "must be a list of {name, model, commit} or {\"adapters\": [...]}")
    out: list[DesiredAdapter] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        where = f"adapters[{index}]"
        if not isinstance(entry, dict):
            raise AdaptersFileError(path, f"{where} must be an object with name, model and commit")
        name, model = str(entry.get("name") or ""), str(entry.get("model") or "")
        commit = entry.get("commit")
        revision = entry.get("revision")
        problem = _entry_problem(where, name, model, commit, served_names, require_commit)
        if problem is None and name in seen:
            problem = f"{where}.name {name!r} is used by an earlier entry: adapter names must be unique"
        seen.add(name)
        out.append(DesiredAdapter(
            name=name or f"<{where}>", model=model, commit=str(commit) if commit else None,
            revision=str(revision) if revision else None, problem=problem,
        ))  # fmt: skip
    return out


def _entry_problem(
    where: str, name: str, model: str, commit: Any, served_names: tuple[str, ...], require_commit: bool = True
) -> str | None:
    if not NAME_PATTERN.match(name):
        return (f"{where}.name {name!r} must be 1-128 letters, digits, '-', '.', '_', ':' or '/', starting with a "
                "letter or digit (it is the OpenAI model name)")
    if name in served_names:
        return f"{where}.name {name!r} is the base model's served name: give the adapter its own name"
    if not model:
        return f"{where}.model is required (a Hugging Face repo id or pvc://claim/path)"
    try:
        source = layout.parse_model(model)
    except ValueError as exc:
        return f"{where}.model: {exc}"
    if commit is not None and not require_commit and not (isinstance(commit, str) and layout.is_commit(commit)):
        return f"{where}.commit must be a 40-hex commit id (got {commit!r}) or left out"
    if require_commit and source.is_hub and not (isinstance(commit, str) and layout.is_commit(commit)):
        return (
            f"{where}.commit must be the 40-hex commit the adapter was cached at (got {commit!r}): "
            "the operator resolves the adapter's revision once and writes it here"
        )
    return None


def read_adapters_file(
    path: Path, *, served_names: tuple[str, ...] = (), require_commit: bool = True
) -> tuple[str, list[DesiredAdapter]]:
    """(digest of the content, entries). Raises AdaptersFileError when the file cannot be used at all."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AdaptersFileError(str(path), "does not exist (the operator mounts it from the adapters ConfigMap)") from None
    except OSError as exc:
        raise AdaptersFileError(str(path), f"cannot be read: {exc}") from None
    digest = hashlib.sha256(raw).hexdigest()[:16]
    try:
        data = yaml.safe_load(raw.decode("utf-8")) if raw.strip() else None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AdaptersFileError(str(path), f"is not JSON or YAML: {exc}") from None
    return digest, parse_adapters(data, path=str(path), served_names=served_names, require_commit=require_commit)


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """Cheap change detection: (inode, size, mtime_ns) of what the path resolves to (a ConfigMap's
    symlink swap changes the target's inode), None when absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
