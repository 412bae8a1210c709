"""Thin kopf handlers: kopf watches and indexes; every event only queues its model's key.

- ``@kopf.index`` keeps the newest body of every VLLMModel and of every child the operator labels (PVCs,
  cache Jobs and their Pods, Deployments, Services), keyed by (namespace, model). kopf fills the
  indexes from its watches before any other handler runs and drops an object's entry when it is
  deleted, so the reconcile reads its children from memory and nothing stays behind a deleted model.
  The optional kinds (KEDA ScaledObjects, HPAs, InferencePools) are indexed the same way; where the
  cluster does not serve one, kopf watches nothing for it and its index stays empty (``apis`` says how
  the operator learns that, and when such an API appears later).
- ``@kopf.on.event`` for VLLMModels and for each child kind queues the model on the Reconciler's work
  queue (``reconcile.py`` says why one queue, not kopf's per-handler retries); a child's event that is
  exactly the operator's own apply coming back queues nothing. The model's own status echo does queue
  it: the plan reads the status (cache summary, plan), so one more look follows each status write. The handlers never
  fail, so kopf never retries them and never writes its progress annotations onto the model.
- Periodic resync: after each reconcile the model is queued again in ``reconcile_interval_seconds``
  (one timer per model, dropped with it); it reads nothing from the API.

No finalizer: children carry ownerReferences and Kubernetes' garbage collector removes them with the
model; a cache kept on purpose (``cache.deletePolicy: Retain``) simply has no ownerReference.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf

from . import builders, crd, kube, metrics
from .apis import OptionalApis
from .config import Config
from .reconcile import MANAGED_BY, WATCHED_CHILDREN, Key, Reconciler

CHILD_LABELS: Mapping[str, Any] = {**MANAGED_BY, builders.LABEL_MODEL: kopf.PRESENT}
MODELS_INDEX = "vllmmodels"
JSON = dict[str, Any]


def _index_name(resource: kube.Resource) -> str:
    return f"children_{resource.plural}"


def _slim(resource: kube.Resource, body: Mapping[str, Any]) -> JSON:
    """What the plan reads of an object: no managedFields, and no pod spec (only the pod's status is read)."""
    slim = kube.slim(body)
    if resource == kube.PODS:
        slim.pop("spec", None)
    return slim


class IndexedState:
    """``reconcile.ClusterState`` over kopf's indexes (live read-only views kopf keeps up to date)."""

    def __init__(self) -> None:
        self._indexes: Mapping[str, Any] = {}

    def bind(self, indexes: Mapping[str, Any]) -> None:
        self._indexes = indexes

    def model(self, key: Key) -> JSON | None:
        store = self._indexes[MODELS_INDEX].get(key)
        return next(iter(store), None) if store is not None else None

    def children(self, resource: kube.Resource, key: Key) -> Iterable[JSON]:
        store = self._indexes[_index_name(resource)].get(key)
        return list(store) if store is not None else []

    def models(self) -> Iterable[Key]:
        return list(self._indexes[MODELS_INDEX].keys())


def register(
    registry: kopf.OperatorRegistry,
    *,
    config: Config,
    login: kube.Login | None = None,
    namespaces: tuple[str, ...] = (),
    pod_status_url: Callable[[Mapping[str, Any]], str] | None = None,
) -> Reconciler:
    """Register every handler of one operator instance on ``registry``; returns its Reconciler.
    ``pod_status_url``: where a model pod's runtime /status is (tests point it at their own server)."""
    login_fn = login or kube.login_from_environment
    client = kube.KubeClient(login_fn, field_manager=config.field_manager)
    state = IndexedState()
    # Namespaced mode: kopf discovers resources at start-up only (``apis`` says why and what follows).
    reconciler = Reconciler(client, config, state, apis=OptionalApis(client, fixed_watches=bool(namespaces)))
    if pod_status_url is not None:
        reconciler.pod_reports.url_for = pod_status_url
    background: dict[str, Any] = {}

    @kopf.on.login(registry=registry)
    async def log_in(**_: Any) -> kopf.ConnectionInfo:
        return await login_fn()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        # kopf's own bookkeeping goes to annotations, never into our status (no handler here uses it).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="vllm-operator.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="vllm-operator.io", key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # Events are posted by the Reconciler on transitions
        # Watch only our children, filtered by the API server.
        for child in WATCHED_CHILDREN:
            settings.watching.label_selectors[child.group, child.plural] = "app.kubernetes.io/managed-by=vllm-operator"
        settings.watching.server_timeout = 270
        settings.watching.client_timeout = 300
        settings.networking.request_timeout = 60
        settings.queueing.worker_limit = config.worker_limit or None
        if namespaces:
            # Namespaced mode needs no cluster-wide reads: no namespace or CRD observation, only the
            # listed namespaces and the resources found at start-up.
            settings.scanning.disabled = True
        state.bind({name: kwargs[name] for name in [MODELS_INDEX, *map(_index_name, WATCHED_CHILDREN)]})
        await reconciler.apis.start()
        reconciler.queue.start()
        metrics.TRACKED.set_function(reconciler.tracked)
        background["metrics"] = metrics.serve(config.metrics_port)

    @kopf.on.cleanup(registry=registry)
    async def clean_up(**_: Any) -> None:
        await reconciler.close()
        server = background.pop("metrics", None)
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        await client.close()

    @kopf.index(crd.GROUP, crd.VERSION, crd.PLURAL, id=MODELS_INDEX, registry=registry)
    def index_model(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, JSON]:
        return {(namespace or "default", name): kube.slim(body)}

    @kopf.on.event(crd.GROUP, crd.VERSION, crd.PLURAL, registry=registry)
    async def model_changed(namespace: str | None, name: str, body: kopf.Body, type: str | None, **_: Any) -> None:
        key = (namespace or "default", name)
        reconciler.saw(kube.VLLMMODELS, key, body, deleted=type == "DELETED")
        reconciler.queue.add(key)

    for child in WATCHED_CHILDREN:

        @kopf.index(child.group, child.version, child.plural, labels=CHILD_LABELS, id=_index_name(child),
                    registry=registry)  # fmt: skip
        def index_child(
            namespace: str | None, labels: Mapping[str, str], body: kopf.Body, child: kube.Resource = child, **_: Any
        ) -> dict[Key, JSON]:
            return {(namespace or "default", labels[builders.LABEL_MODEL]): _slim(child, body)}

        @kopf.on.event(child.group, child.version, child.plural, labels=CHILD_LABELS, registry=registry)
        async def child_changed(
            namespace: str | None,
            labels: Mapping[str, str],
            body: kopf.Body,
            type: str | None,
            child: kube.Resource = child,
            **_: Any,
        ) -> None:
            key = (namespace or "default", labels[builders.LABEL_MODEL])
            if not reconciler.saw(child, key, body, deleted=type == "DELETED"):
                reconciler.queue.add(key)  # an own apply's exact echo: the reconcile that wrote it saw it all

    return reconciler
