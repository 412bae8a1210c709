"""``vllm-runtime cache --adapters-file``: cache each adapter after the base model, exactly like a model.

Each Hub adapter goes through ``cache.command.run_cache`` (revision resolved once to a commit, files
selected, sha256-verified, its own manifest; a warm adapter costs no weight reads), then its
``adapter_config.json`` is read from the verified snapshot (rank, no weights). The outcome of each is one
compact entry in the summary's ``"adapters"`` (the contract in docs/adapters.md):

- cached: ``{"name", "model", "revision", "commit", "bytes", "rank"}``;
- failed: ``{"name", "model", "revision", "reason", "retryable", "message"}``;
- ``pvc://`` (nothing to download; serve reads the claim): ``{"name", "model", "local": true}``.

The exit code and the summary's ``ok`` stay the base model's: an adapter never keeps the base from serving.
``fit_summary`` keeps the whole line within Kubernetes' 4096-byte termination message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_runtime import summary
from vllm_runtime.adapters import checks, errors
from vllm_runtime.adapters.desired import DesiredAdapter, read_adapters_file
from vllm_runtime.layout import CacheLayout

log = logging.getLogger("vllm_runtime.cache")

MESSAGE_CHARS = 200  # per failed adapter; the termination message is shared by every entry
# Shed in this order when the line is too long; name and the outcome fields always stay.
SHEDDABLE = ("message", "revision", "model", "rank")
BUDGET = summary.MAX_TERMINATION_MESSAGE_BYTES - 64


def read_entries(path: Path) -> list[DesiredAdapter]:
    """The adapters to cache (commit optional). Raises AdaptersFileError when the file is unusable."""
    _, entries = read_adapters_file(path, require_commit=False)
    return entries


def _failure(entry: DesiredAdapter, revision: str, reason: str, message: str, retryable: bool) -> dict[str, Any]:
    if len(message) > MESSAGE_CHARS:
        message = message[: MESSAGE_CHARS - 3] + "..."
    return {"name": entry.name, "model": entry.model, "revision": revision, "reason": reason,
            "retryable": retryable, "message": message}  # fmt: skip


def cache_adapter(opts: Any, entry: DesiredAdapter) -> dict[str, Any]:
    """Cache one adapter with the base model's options (``CacheOptions``); its summary entry."""
    from vllm_runtime.cache.command import run_cache

    revision = entry.commit or entry.revision or "main"
    if entry.problem is not None:
        return _failure(entry, revision, errors.InvalidAdapterEntry.reason, entry.problem, False)
    if not entry.is_hub:
        return {"name": entry.name, "model": entry.model, "local": True}
    result = run_cache(replace(opts, model=entry.model, revision=revision, include=(), exclude=()))
    if not result.ok:
        return _failure(entry, revision, str(result.reason), str(result.message or ""), bool(result.retryable))
    assert result.commit is not None
    snapshot = CacheLayout(opts.cache_dir).snapshot_dir(entry.model, result.commit)
    try:
        facts = checks.read_adapter_facts(snapshot, entry.name, headers=False)  # the shapes are serve's check
    except errors.AdapterError as exc:
        return _failure(entry, revision, exc.reason, exc.message, exc.retryable)
    log.info("adapter %s: %s@%s cached and verified (rank %d, %d bytes)", entry.name, entry.model, result.commit,
             facts.rank, result.bytes or 0)
    return {"name": entry.name, "model": entry.model, "revision": revision, "commit": result.commit,
            "bytes": result.bytes, "rank": facts.rank}  # fmt: skip


def describe_cached(result: summary.Summary, cache_dir: Path) -> None:
    """A plain ``cache --model <adapter repo>`` (the operator's per-adapter cache Job): when the cached commit
    is a LoRA adapter (adapter_config.json at its top level), add ``"adapter": {"rank", "targetModules",
    "baseModel"}`` to the summary (or ``{"reason", "message"}`` when vLLM could not load it). No weight read."""
    if not result.ok or not result.commit:
        return
    snapshot = CacheLayout(cache_dir).snapshot_dir(result.model, result.commit)
    if not (snapshot / checks.CONFIG_FILE).is_file():
        return
    try:
        facts = checks.read_adapter_facts(snapshot, result.model, headers=False)
    except errors.AdapterError as exc:
        result.extra["adapter"] = {"reason": exc.reason, "message": exc.message[:MESSAGE_CHARS]}
        return
    result.extra["adapter"] = {"rank": facts.rank, "targetModules": list(facts.target_modules)[:16],
                               "baseModel": (facts.base_model or "")[:200] or None}  # fmt: skip


def cache_adapters(opts: Any, entries: list[DesiredAdapter]) -> list[dict[str, Any]]:
    """Every entry in file order, after the base model was cached."""
    out = [cache_adapter(opts, entry) for entry in entries]
    failed = [e["name"] for e in out if "reason" in e]
    if failed:
        log.error("%d of %d adapter(s) not cached: %s", len(failed), len(out), ", ".join(failed))
    return out


def _fits(result: summary.Summary) -> bool:
    """The whole line fits without ``Summary.to_json`` dropping an extra field (it drops the largest first,
    which would be the adapters)."""
    line = result.to_json()
    return len(line.encode()) <= BUDGET and "truncated" not in json.loads(line)


def fit_summary(result: summary.Summary) -> None:
    """Shorten ``result.extra["adapters"]`` until the summary fits its 4096 bytes (see the module doc)."""
    entries: list[dict[str, Any]] = result.extra.get("adapters") or []
    if not entries or _fits(result):
        return
    for field in SHEDDABLE:
        for entry in entries:
            entry.pop(field, None)
        if _fits(result):
            return
    dropped = 0
    while entries and not _fits(result):
        entries.pop()
        dropped += 1
        result.extra["adaptersTruncated"] = dropped
