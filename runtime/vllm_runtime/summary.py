"""The one-line JSON summary a runtime command leaves in the termination message, and its exit codes.

The operator reads the cache Job pod's ``terminationMessage`` (Kubernetes copies the file at
``layout.TERMINATION_MESSAGE_PATH`` there, at most 4096 bytes), so the outcome reaches the
VLLMModel's status without giving pods any Kubernetes API rights.

Success::

    {"ok": true, "command": "cache", "model": "org/name", "revision": "main",
     "commit": "<40 hex>", "bytes": 123, "files": 7, "verified": true,
     "completedAt": "2026-11-27T21:00:00Z", "durationSeconds": 12.3}

Failure::

    {"ok": false, "command": "cache", "model": "org/name", "revision": "main",
     "reason": "GatedRepo", "message": "... what to do ...", "retryable": false}

Never a token: messages are built from our own words and the Hub's error class, not raw responses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Exit codes shared by every runtime command. The cache Job's backoff policy relies on them:
# permanent failures are not worth retrying, retryable ones are.
EXIT_OK = 0
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_PERMANENT = 3  # the input can never work as given: fix the spec (auth, not found, no space, ...)
EXIT_RETRYABLE = 4  # a transient failure (Hub 5xx/429, network, stalled transfer): try again later

# Failure reasons (CamelCase, as Kubernetes condition reasons).
REASONS_PERMANENT = frozenset(
    {
        "GatedRepo",
        "Unauthorized",
        "RepoNotFound",
        "RevisionNotFound",
        "InsufficientSpace",
        "VerificationFailed",
        "InvalidModel",
        "NoCompleteCache",
        "NoWeights",
        "InvalidArgs",
        # cache: the revision, the Hub's answer or the volume is unusable; an unforeseen exception
        "InvalidRevision",
        "InvalidHubResponse",
        "CacheDirInvalid",
        "ReadOnlyVolume",
        "InternalError",
        # serve: why vLLM failed to start (vllm_runtime.failures); the spec must change
        "OutOfMemory",
        "NoKVCacheMemory",
        "KVCacheTooSmall",
        "QuantizationUnsupported",
        "QuantizationMismatch",
        "MissingFiles",
        "CorruptFiles",
        "RemoteCodeNotTrusted",
        "UnsupportedArchitecture",
        "MaxModelLenTooLarge",
        "VLLMFailed",
        # serve: the memory plan does not fit the visible GPUs' free memory (checked before vLLM starts)
        "InsufficientGPUMemory",
    }
)
REASONS_RETRYABLE = frozenset({"HubUnavailable", "RateLimited", "Stalled", "NetworkError", "CacheBusy"})

MAX_TERMINATION_MESSAGE_BYTES = 4096


@dataclass
class Summary:
    ok: bool
    command: str
    model: str
    revision: str
    commit: str | None = None
    bytes: int | None = None
    files: int | None = None
    verified: bool | None = None
    completedAt: str | None = None  # noqa: N815 - JSON field name
    durationSeconds: float | None = None  # noqa: N815
    reason: str | None = None
    message: str | None = None
    retryable: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One JSON line within Kubernetes' 4096-byte termination message limit.

        When too long, the message is shortened first, then the largest extra fields are dropped
        (their names listed under ``truncated``): the core fields always survive.
        """
        core = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        extra = dict(self.extra)
        dropped: list[str] = []
        while True:
            data = {**core, **extra}
            if dropped:
                data["truncated"] = sorted(dropped)
            line = json.dumps(data, separators=(",", ":"), sort_keys=True)
            if len(line.encode()) <= MAX_TERMINATION_MESSAGE_BYTES:
                return line
            message = core.get("message")
            if isinstance(message, str) and len(message) > 1003:  # 1000 characters and "..."
                core["message"] = message[:1000] + "..."
            elif extra:
                largest = max(extra, key=lambda k: len(json.dumps(extra[k], default=str)))
                del extra[largest]
                dropped.append(largest)
            else:
                core["message"] = str(core.get("message", ""))[:200] + "..."
                return json.dumps(core, separators=(",", ":"), sort_keys=True)[:MAX_TERMINATION_MESSAGE_BYTES]


def write_termination_message(summary: Summary, path: str | Path) -> None:
    """Write the summary where Kubernetes picks it up; never fail the command over it."""
    try:
        Path(path).write_text(summary.to_json() + "\n")
    except OSError:
        pass


def adapter_entries(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The cache summary's per-adapter entries (``cache --adapters-file``), ``[]`` when there are none.

    Each has ``name`` and either ``commit`` and ``bytes`` (cached and verified) or ``reason`` and
    ``retryable`` (not cached), or ``local: true`` (a pvc:// adapter); ``model``, ``revision``, ``rank`` and
    ``message`` may be left out when the 4096 bytes are short. ``adaptersTruncated`` counts entries left out.
    """
    entries = (data or {}).get("adapters")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """Parse a termination message written by ``write_termination_message``; None if it is not one."""
    if not text:
        return None
    for line in reversed(text.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "ok" in data:
            return data
    return None
