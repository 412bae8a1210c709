"""The base of the runtime's classified failures (``cache.errors.CacheError``, ``adapters.errors.AdapterError``).

A failure carries what the summary (``summary.Summary``) and ``GET /status`` report: a ``reason`` (a Kubernetes
condition reason, on the class), an actionable ``message``, and whether trying again can help (``retryable``,
on the class). Callers branch on the type or the class attributes, never on the message.
"""

from __future__ import annotations

from typing import ClassVar


class ClassifiedError(Exception):
    """A failure with a ``reason``, a ``message`` and ``retryable``; subclasses set ``reason`` and ``retryable``."""

    reason: ClassVar[str]
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
