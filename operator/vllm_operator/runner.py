"""Run the operator: kopf with this project's handlers, standalone (one replica, no peering).

``run`` is the command line's entry; ``operator_task`` embeds the same operator in an event loop
(the kmock tests run it against the API emulator with their own login).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from . import handlers, kube
from .config import Config


def build_registry(
    config: Config,
    namespaces: tuple[str, ...] = (),
    *,
    login: kube.Login | None = None,
    pod_status_url: Callable[[Mapping[str, Any]], str] | None = None,
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, config=config, login=login, namespaces=namespaces, pod_status_url=pod_status_url)
    return registry


async def operator_task(
    config: Config,
    namespaces: tuple[str, ...] = (),
    *,
    login: kube.Login | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness_endpoint: str | None = None,
    pod_status_url: Callable[[Mapping[str, Any]], str] | None = None,
) -> None:
    """The operator as a coroutine: returns when ``stop_flag`` is set (or on a fatal error).

    kopf cancels every task created in its event loop after it started when it stops, so an
    embedding program (a test with an in-process API emulator) runs it in a thread of its own
    with threading.Event flags.
    """
    await kopf.operator(
        registry=build_registry(config, namespaces, login=login, pod_status_url=pod_status_url),
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
        memo=kopf.Memo(),
    )


def run(config: Config, namespaces: tuple[str, ...] = (), *, liveness_endpoint: str | None = None) -> int:
    """Run until SIGINT/SIGTERM; all namespaces when ``namespaces`` is empty."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(operator_task(config, namespaces, liveness_endpoint=liveness_endpoint))
    except asyncio.CancelledError:  # kopf stops by cancelling its tasks (as kopf.run does)
        pass
    return 0
