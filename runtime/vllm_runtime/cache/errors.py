"""Cache failures: one class per reason, ``retryable`` on the class, an exit code from it.

The style of huggingface_hub's errors: callers branch on the type (``except HubUnavailable``) or on
the class attributes, never on the message. Each class carries the summary ``reason`` (a Kubernetes
condition reason) and whether trying again can help; exit code 4 means retryable, 3 permanent.

``classify`` turns anything raised while caching into one of these. An exception it does not know is
an ``InternalError`` (permanent) carrying the exception's type and message: retrying a bug or an
unforeseen local problem forever helps nobody, and the message says what really happened.

Messages are built from our own words plus the Hub's short error text, never from request headers,
so a token cannot leak through them (the redaction filter in ``progress`` is the second line of
defence).
"""

from __future__ import annotations

import errno
import json

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from vllm_runtime import summary
from vllm_runtime.errors import ClassifiedError


class CacheError(ClassifiedError):
    """A classified failure of ``vllm-runtime cache``. Subclasses set ``reason`` and ``retryable``."""

    reason = "InternalError"

    @property
    def exit_code(self) -> int:
        return summary.EXIT_RETRYABLE if self.retryable else summary.EXIT_PERMANENT


# ---- permanent: the spec, the volume or the Hub's answer must change
class InternalError(CacheError):
    """An exception nobody foresaw; its type and message are kept so the cause is visible."""

    reason = "InternalError"


class GatedRepo(CacheError):
    reason = "GatedRepo"


class Unauthorized(CacheError):
    reason = "Unauthorized"


class RepoNotFound(CacheError):
    reason = "RepoNotFound"


class RevisionNotFound(CacheError):
    reason = "RevisionNotFound"


class InvalidRevision(CacheError):
    """``--revision`` is neither a git ref name nor a 40-hex commit."""

    reason = "InvalidRevision"


class InvalidModel(CacheError):
    reason = "InvalidModel"


class NoWeights(CacheError):
    reason = "NoWeights"


class InvalidHubResponse(CacheError):
    """The Hub (or what answers at HF_ENDPOINT) sent something that is not a Hub answer: HTML, bad JSON,
    a commit id that is not 40 hex."""

    reason = "InvalidHubResponse"


class InsufficientSpace(CacheError):
    reason = "InsufficientSpace"


class VerificationFailed(CacheError):
    reason = "VerificationFailed"


class CacheDirInvalid(CacheError):
    """The cache directory, or a directory the layout needs inside it, is a file."""

    reason = "CacheDirInvalid"


class ReadOnlyVolume(CacheError):
    """The cache volume cannot be written: mounted read-only, or permissions forbid it."""

    reason = "ReadOnlyVolume"


# ---- retryable: the same command may succeed later
class HubUnavailable(CacheError):
    reason = "HubUnavailable"
    retryable = True


class RateLimited(CacheError):
    reason = "RateLimited"
    retryable = True


class Stalled(CacheError):
    reason = "Stalled"
    retryable = True


class NetworkError(CacheError):
    reason = "NetworkError"
    retryable = True


class CacheBusy(CacheError):
    reason = "CacheBusy"
    retryable = True


ERROR_CLASSES: tuple[type[CacheError], ...] = (
    InternalError, GatedRepo, Unauthorized, RepoNotFound, RevisionNotFound, InvalidRevision, InvalidModel,
    NoWeights, InvalidHubResponse, InsufficientSpace, VerificationFailed, CacheDirInvalid, ReadOnlyVolume,
    HubUnavailable, RateLimited, Stalled, NetworkError, CacheBusy,
)


def _http_status(error: HfHubHTTPError) -> int:
    return error.response.status_code if error.response is not None else 0


def is_bare_consistency_error(error: BaseException) -> bool:
    """huggingface_hub reports a short body as a bare ``OSError`` without errno; real I/O errors carry one."""
    return type(error) is OSError and error.errno is None


def is_retryable_transfer_error(error: BaseException) -> bool:
    """Worth another try: Hub 5xx/429, a dropped or timed-out connection, a short body."""
    if isinstance(error, CacheError):
        return error.retryable
    if isinstance(error, HfHubHTTPError):
        status = _http_status(error)
        return status in (408, 429) or status >= 500
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        return True
    return is_bare_consistency_error(error)


def _classify_os_error(error: OSError, repo_id: str) -> CacheError | None:
    """Local file-system failures: say which path and what to change on the volume."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:  # despite the space check (another writer?)
        return InsufficientSpace("the cache volume ran out of space while downloading: grow spec.cache.size")
    if error.errno == errno.EROFS:
        return ReadOnlyVolume(
            f"the cache volume is read-only{where}: the cache Job must mount it read-write "
            "(check the PVC's accessModes and the volume's mount options)"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return ReadOnlyVolume(
            f"permission denied writing the cache{where}: make the volume writable by the pod's user "
            "(securityContext.fsGroup, or the volume's ownership)"
        )
    if error.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(error, (NotADirectoryError, FileExistsError)):
        return CacheDirInvalid(
            f"a file stands where the cache needs a directory{where}: --cache-dir must be a directory (the cache "
            "volume's mount); remove the file or point --cache-dir elsewhere"
        )
    return None


def classify(error: BaseException, *, repo_id: str, revision: str, has_token: bool) -> CacheError:
    """Turn any exception from caching into a ``CacheError`` subclass with an actionable message."""
    if isinstance(error, CacheError):
        return error
    if isinstance(error, GatedRepoError):
        if has_token:
            return GatedRepo(
                f"{repo_id} is gated and the token in HF_TOKEN has no access to it: accept the model's terms on "
                "the Hub with the account that owns the token (or use a token that has access), and reference it "
                "with spec.hfTokenSecretRef",
            )
        return GatedRepo(
            f"{repo_id} is gated: accept its terms on the Hub, create a read token, store it in a Secret and set "
            "spec.hfTokenSecretRef (name, key) so the cache Job gets it as HF_TOKEN",
        )
    if isinstance(error, RevisionNotFoundError):
        return RevisionNotFound(
            f"revision {revision!r} does not exist in {repo_id}: set spec.revision to an existing branch, tag or "
            "40-hex commit",
        )
    if isinstance(error, RepositoryNotFoundError):
        hint = (
            "the token in HF_TOKEN cannot see it" if has_token
            else "if it is private, set spec.hfTokenSecretRef to a Secret holding a token that can read it"
        )
        return RepoNotFound(f"repository {repo_id} was not found: check spec.model; {hint}")
    if isinstance(error, RemoteEntryNotFoundError):
        return InvalidModel(f"a file listed for {repo_id}@{revision} is missing on the Hub; try again or pin a commit")
    if isinstance(error, HfHubHTTPError):
        status = _http_status(error)
        if status in (401, 403):
            return Unauthorized(
                f"the Hub refused access to {repo_id} (HTTP {status}): check the token referenced by "
                "spec.hfTokenSecretRef",
            )
        if status == 429:
            return RateLimited(f"the Hub kept rate-limiting downloads of {repo_id} (HTTP 429); retrying later")
        if status >= 500 or status == 408:
            return HubUnavailable(f"the Hub answered HTTP {status} for {repo_id} after retries; retrying later")
        return InvalidModel(f"the Hub answered HTTP {status} for {repo_id}: check spec.model")
    if isinstance(error, HFValidationError):  # before ValueError: huggingface_hub refused the repo id itself
        return InvalidModel(f"spec.model {repo_id!r} is not a valid Hugging Face repo id: {error}")
    if isinstance(error, json.JSONDecodeError):
        return InvalidHubResponse(
            f"the Hub's answer for {repo_id}@{revision} is not valid JSON ({error.msg} at character {error.pos}): "
            "HF_ENDPOINT must point at a Hugging Face Hub or a mirror of its API, not a web page or proxy login",
        )
    if isinstance(error, httpx2.TimeoutException):
        return Stalled(
            f"the transfer of {repo_id} stalled (no bytes within the stall timeout) after retries; check the "
            "network path to HF_ENDPOINT, or raise --stall-timeout",
        )
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)) or is_bare_consistency_error(error):
        return NetworkError(
            f"could not reach the Hub for {repo_id} ({type(error).__name__}); check HF_ENDPOINT and the "
            "network; retrying later",
        )
    if isinstance(error, OSError):
        local = _classify_os_error(error, repo_id)
        if local is not None:
            return local
    return InternalError(
        f"internal error while caching {repo_id}@{revision}: {type(error).__name__}: {error}"[:900]
        + "; this is a bug or an unforeseen condition: report it with the cache Job's log",
    )
