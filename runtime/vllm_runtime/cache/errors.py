"""Cache failures: each maps to a summary reason, a message that says what to do, and an exit code.

huggingface_hub's typed errors (and httpx2's transport errors) are classified here; our own checks
raise ``CacheError`` directly. Messages are built from our own words plus the Hub's short error
text, never from request headers, so a token cannot leak through them (the redaction filter in
``progress`` is the second line of defence).
"""

from __future__ import annotations

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from vllm_runtime import summary


class CacheError(Exception):
    """A classified failure of ``vllm-runtime cache``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.reason in summary.REASONS_RETRYABLE

    @property
    def exit_code(self) -> int:
        return summary.EXIT_RETRYABLE if self.retryable else summary.EXIT_PERMANENT


def is_retryable_transfer_error(error: BaseException) -> bool:
    """Worth another try: Hub 5xx/429, a dropped or timed-out connection, a short body."""
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        return status in (408, 429) or status >= 500
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        return True
    # huggingface_hub raises a bare OSError("Consistency check failed ...") for a truncated body.
    return type(error) is OSError and "Consistency check failed" in str(error)


def classify(error: BaseException, *, repo_id: str, revision: str, has_token: bool) -> CacheError:
    """Turn any exception from a transfer into a ``CacheError`` with an actionable message."""
    if isinstance(error, CacheError):
        return error
    if isinstance(error, GatedRepoError):
        if has_token:
            return CacheError(
                "GatedRepo",
                f"{repo_id} is gated and the token in HF_TOKEN has no access to it: accept the model's terms on "
                "the Hub with the account that owns the token (or use a token that has access), and reference it "
                "with spec.hfTokenSecretRef",
            )
        return CacheError(
            "GatedRepo",
            f"{repo_id} is gated: accept its terms on the Hub, create a read token, store it in a Secret and set "
            "spec.hfTokenSecretRef (name, key) so the cache Job gets it as HF_TOKEN",
        )
    if isinstance(error, RevisionNotFoundError):
        return CacheError(
            "RevisionNotFound",
            f"revision {revision!r} does not exist in {repo_id}: set spec.revision to an existing branch, tag or "
            "40-hex commit",
        )
    if isinstance(error, RepositoryNotFoundError):
        hint = (
            "the token in HF_TOKEN cannot see it" if has_token
            else "if it is private, set spec.hfTokenSecretRef to a Secret holding a token that can read it"
        )
        return CacheError("RepoNotFound", f"repository {repo_id} was not found: check spec.model; {hint}")
    if isinstance(error, RemoteEntryNotFoundError):
        return CacheError(
            "InvalidModel", f"a file listed for {repo_id}@{revision} is missing on the Hub; try again or pin a commit"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        if status in (401, 403):
            return CacheError(
                "Unauthorized",
                f"the Hub refused access to {repo_id} (HTTP {status}): check the token referenced by "
                "spec.hfTokenSecretRef",
            )
        if status == 429:
            return CacheError(
                "RateLimited", f"the Hub kept rate-limiting downloads of {repo_id} (HTTP 429); retrying later"
            )
        if status >= 500 or status == 408:
            return CacheError(
                "HubUnavailable", f"the Hub answered HTTP {status} for {repo_id} after retries; retrying later"
            )
        return CacheError("InvalidModel", f"the Hub answered HTTP {status} for {repo_id}: check spec.model")
    if isinstance(error, httpx2.TimeoutException):
        return CacheError(
            "Stalled",
            f"the transfer of {repo_id} stalled (no bytes within the stall timeout) after retries; check the "
            "network path to HF_ENDPOINT, or raise --stall-timeout",
        )
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)) or is_retryable_transfer_error(error):
        return CacheError(
            "NetworkError",
            f"could not reach the Hub for {repo_id} ({type(error).__name__}); check HF_ENDPOINT and the "
            "network; retrying later",
        )
    if isinstance(error, OSError) and error.errno == 28:  # ENOSPC despite the check (another writer?)
        return CacheError(
            "InsufficientSpace", "the cache volume ran out of space while downloading: grow spec.cache.size"
        )
    return CacheError("NetworkError", f"unexpected {type(error).__name__} while caching {repo_id}; retrying later")
