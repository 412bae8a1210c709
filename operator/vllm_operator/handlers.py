"""Thin kopf handlers: they unpack kopf's arguments and call the Reconciler.

- VLLMModel created, spec changed, or found at start-up -> reconcile it (kopf retries on TemporaryError).
- A child (PVC, cache Job, its Pods, Deployment, Service) changed or was deleted -> reconcile its model,
  so a child deleted by hand comes back at once and the Job's outcome reaches the status. Child events
  are coalesced: the first waits ``child_event_delay_seconds``, those arriving meanwhile only join it.
- Every ``reconcile_interval_seconds`` every VLLMModel is reconciled again (level-triggered safety net).

No finalizer: children carry ownerReferences and Kubernetes' garbage collector removes them with the
model; a cache kept on purpose (``cache.deletePolicy: Retain``) simply has no ownerReference. kopf's
timers and daemons would add a finalizer, so the periodic resync is a plain background task instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from . import builders, crd, kube, metrics
from .config import Config
from .reconcile import MANAGED_BY, Reconciler

CHILDREN = (kube.PVCS, kube.JOBS, kube.PODS, kube.DEPLOYMENTS, kube.SERVICES)
CHILD_LABELS: Mapping[str, Any] = {**MANAGED_BY, builders.LABEL_MODEL: kopf.PRESENT}
PROGRESS_PREFIX = "vllm-operator.io"


def register(
    registry: kopf.OperatorRegistry,
    *,
    config: Config,
    login: kube.Login | None = None,
    namespaces: tuple[str, ...] = (),
) -> Reconciler:
    """Register every handler of one operator instance on ``registry``; returns its Reconciler."""
    login_fn = login or kube.login_from_environment
    client = kube.KubeClient(login_fn, field_manager=config.field_manager)
    reconciler = Reconciler(client, config)
    background: dict[str, Any] = {}

    @kopf.on.login(registry=registry)
    async def log_in(**_: Any) -> kopf.ConnectionInfo:
        return await login_fn()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
        # kopf's own bookkeeping goes to annotations, never into our status.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PROGRESS_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PROGRESS_PREFIX, key="last-handled-configuration"
        )
        # Events are posted explicitly on transitions; handler log lines stay logs.
        settings.posting.level = logging.WARNING
        # Watch only our children, filtered by the API server.
        for child in CHILDREN:
            settings.watching.label_selectors[child.group, child.plural] = "app.kubernetes.io/managed-by=vllm-operator"
        settings.watching.server_timeout = 270
        settings.watching.client_timeout = 300
        settings.networking.request_timeout = 60
        settings.queueing.error_delays = (1, 2, 5, 10, 30, 60)
        settings.queueing.worker_limit = config.worker_limit or None
        background["metrics"] = metrics.serve(config.metrics_port)
        background["resync"] = asyncio.create_task(_resync(reconciler, config, namespaces, logger))

    @kopf.on.cleanup(registry=registry)
    async def clean_up(**_: Any) -> None:
        task = background.pop("resync", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        server = background.pop("metrics", None)
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        reconciler.close()
        await client.close()

    @kopf.on.resume(crd.GROUP, crd.VERSION, crd.PLURAL, registry=registry)
    @kopf.on.create(crd.GROUP, crd.VERSION, crd.PLURAL, registry=registry)
    @kopf.on.update(crd.GROUP, crd.VERSION, crd.PLURAL, field="spec", registry=registry)
    async def reconcile_model(namespace: str | None, name: str, logger: kopf.Logger, **_: Any) -> None:
        await reconciler.reconcile(namespace or "default", name, logger)

    # optional=True: no finalizer; this only drops the model's in-memory state and metrics.
    @kopf.on.delete(crd.GROUP, crd.VERSION, crd.PLURAL, optional=True, registry=registry)
    async def forget_model(namespace: str | None, name: str, **_: Any) -> None:
        reconciler.forget(namespace or "default", name)

    for child in CHILDREN:

        @kopf.on.event(child.group, child.version, child.plural, labels=CHILD_LABELS, registry=registry)
        async def child_changed(
            namespace: str | None,
            labels: Mapping[str, str],
            body: kopf.Body,
            type: str | None,
            logger: kopf.Logger,
            child: kube.Resource = child,
            **_: Any,
        ) -> None:
            ns, model = namespace or "default", labels[builders.LABEL_MODEL]
            deleted = type == "DELETED"
            reconciler.seen(child, ns, model, body, deleted=deleted)
            if not deleted and reconciler.is_own_write(child, ns, model, body):
                return  # the echo of a reconcile's own apply: that reconcile already saw this state
            await reconciler.trigger(ns, model, logger, delay=config.child_event_delay_seconds, fresh=False)

    return reconciler


async def _resync(reconciler: Reconciler, config: Config, namespaces: tuple[str, ...], logger: kopf.Logger) -> None:
    """Reconcile every VLLMModel periodically: what no watch event announces still converges."""
    interval = max(1.0, config.reconcile_interval_seconds)
    while True:
        await asyncio.sleep(interval)
        try:
            models: list[dict[str, Any]] = []
            for ns in namespaces or (None,):
                models += await reconciler.client.list(kube.VLLMMODELS, ns, {})
        except Exception as exc:  # noqa: BLE001 - the safety net itself must survive any failure
            logger.warning(f"resync: cannot list VLLMModels: {exc}")
            continue
        for body in models:
            meta = body.get("metadata") or {}
            await reconciler.trigger(str(meta.get("namespace")), str(meta.get("name")), logger)
