"""Why an adapter is not loaded: one class per reason, each with the fix and whether a retry can help.

Reasons (``AdapterError.reason``) are part of the runtime's status contract (``/status``): the operator
copies them into the VLLMModel's ``AdaptersReady`` condition. Unknown vLLM failures are
``AdapterLoadFailed``: permanent, with vLLM's own words as the cause (retrying the same files into the
same server gives the same answer; changing the adapter's entry retries it).
"""

from __future__ import annotations

import re

from vllm_runtime.errors import ClassifiedError


class AdapterError(ClassifiedError):
    """An adapter that is not loaded, and why. ``message`` names the adapter and the fix."""

    reason = "AdapterLoadFailed"

    def __init__(self, adapter: str, message: str) -> None:
        super().__init__(f"adapter {adapter!r}: {message}")
        self.adapter = adapter


class InvalidAdapterEntry(AdapterError):
    """The entry in the adapters file cannot be used (bad name, repo id or commit, duplicate)."""

    reason = "InvalidAdapter"


class AdapterNotCached(AdapterError):
    """No completed, verified cache of the adapter's commit yet (the cache Job may still be running)."""

    reason = "AdapterNotCached"
    retryable = True


class AdapterFilesMissing(AdapterError):
    """adapter_config.json or the adapter's weights (adapter_model.safetensors/.bin) are absent."""

    reason = "AdapterFilesMissing"


class AdapterRankTooHigh(AdapterError):
    """The adapter's rank is above the server's --max-lora-rank (fixed when vLLM starts)."""

    reason = "AdapterRankTooHigh"


class AdapterBaseMismatch(AdapterError):
    """The adapter was trained for another base model (architecture or hidden size)."""

    reason = "AdapterBaseMismatch"


class AdapterUnsupportedModules(AdapterError):
    """The adapter targets modules vLLM cannot apply LoRA to on this base model."""

    reason = "AdapterUnsupportedModules"


class AdapterInvalidConfig(AdapterError):
    """adapter_config.json is not a PEFT LoRA config vLLM can read."""

    reason = "AdapterInvalidConfig"


class VllmUnavailable(AdapterError):
    """vLLM's adapter API did not answer (starting, overloaded, or runtime LoRA updating disabled)."""

    reason = "VllmUnavailable"
    retryable = True


class AdapterLoadFailed(AdapterError):
    """vLLM refused the adapter for a reason not classified above (its words are in the message)."""

    reason = "AdapterLoadFailed"


REASONS: tuple[type[AdapterError], ...] = (
    InvalidAdapterEntry, AdapterNotCached, AdapterFilesMissing, AdapterRankTooHigh, AdapterBaseMismatch,
    AdapterUnsupportedModules, AdapterInvalidConfig, VllmUnavailable, AdapterLoadFailed,
)  # fmt: skip

# vLLM 0.32's words (lora/peft_helper.py, lora/lora_model.py, lora/worker_manager.py, torch shape errors).
_VLLM_PATTERNS: tuple[tuple[re.Pattern[str], type[AdapterError], str], ...] = (
    (re.compile(r"LoRA rank (\d+) is greater than max_lora_rank (\d+)"), AdapterRankTooHigh,
     "its rank is above the server's max LoRA rank: raise maxLoraRank (a restart) or use a lower-rank adapter"),
    (re.compile(r"expected target modules in .* but received"), AdapterUnsupportedModules,
     "it targets modules vLLM cannot apply LoRA to on this base: retrain it on the base's linear layers"),
    (re.compile(r"doesn't contain tensors|No adapter found|LoRAAdapterNotFound|not found at"), AdapterFilesMissing,
     "its weights are missing: the repo needs adapter_model.safetensors; cache the adapter again"),
    (re.compile(r"size mismatch|must match the size|shape .* (?:is invalid|mismatch)|The size of tensor",
                re.IGNORECASE), AdapterBaseMismatch,
     "its tensors do not fit this base model: use an adapter trained for the served base model"),
    (re.compile(r"Missing required configuration fields|must be a positive integer|bias is not supported"),
     AdapterInvalidConfig, "vLLM cannot use its adapter_config.json: fix the PEFT config"),
)  # fmt: skip


def classify_vllm_error(adapter: str, status: int, body: str) -> AdapterError:
    """The typed reason for vLLM's answer to ``POST /v1/load_lora_adapter`` (status >= 400)."""
    detail = _error_message(body)
    for pattern, cls, fix in _VLLM_PATTERNS:
        if pattern.search(detail):
            return cls(adapter, f"{fix} (vLLM: {detail[:300]})")
    if status in (404, 405) and "load_lora_adapter" not in detail:
        return VllmUnavailable(
            adapter, f"vLLM has no runtime adapter API (HTTP {status}): start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        )
    if status in (502, 503, 504):
        return VllmUnavailable(adapter, f"vLLM answered HTTP {status}; retrying")
    return AdapterLoadFailed(adapter, f"vLLM refused it (HTTP {status}): {detail[:300]}")


def _error_message(body: str) -> str:
    """vLLM's ErrorResponse JSON is ``{"error": {"message": ...}}``; older ones put ``message`` on top."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
    return body.strip()
