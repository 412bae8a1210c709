"""The periodic resync: every VLLMModel is reconciled again, whatever the watches missed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vllm_operator import handlers, kube
from vllm_operator.config import Config


class _FakeClient:
    def __init__(self) -> None:
        self.calls = 0

    async def list(self, resource: kube.Resource, namespace: str | None, labels: dict[str, str]) -> list[Any]:
        self.calls += 1
        if self.calls == 1:
            raise kube.ApiError(500, "InternalError", "injected")  # a failed listing is skipped, not fatal
        return [{"metadata": {"namespace": namespace or "default", "name": "m"}}]


class _FakeReconciler:
    def __init__(self) -> None:
        self.client = _FakeClient()
        self.triggered: list[tuple[str, str]] = []
        self.done = asyncio.Event()

    async def trigger(self, namespace: str, name: str, logger: Any) -> None:
        self.triggered.append((namespace, name))
        if len(self.triggered) >= 2:
            self.done.set()


async def test_resync_reconciles_every_model_in_every_watched_namespace() -> None:
    reconciler = _FakeReconciler()
    config = Config(reconcile_interval_seconds=0)  # the loop waits at least 1 s between rounds
    task = asyncio.create_task(
        handlers._resync(reconciler, config, ("a", "b"), logging.getLogger("test"))  # type: ignore[arg-type]
    )
    try:
        await asyncio.wait_for(reconciler.done.wait(), 10)
    finally:
        task.cancel()
    # Round 1 failed to list and was skipped; round 2 reconciled both namespaces' models.
    assert reconciler.triggered[:2] == [("a", "m"), ("b", "m")]
    assert reconciler.client.calls == 3
