"""Reconcile one VLLMModel: read the actual state, plan (``plan.plan_reconcile``, pure), then act.

Every trigger -- kopf's create/update/resume handlers, a child's watch event, the periodic resync --
ends in ``Reconciler.reconcile``: one run at a time per model, the parent read fresh each time. The
children are read from the API on a model's first reconcile and on every resync; a child's watch event
reconciles from what the watches and the operator's own applies reported since (no reads but the model
and its PVC), and an event that only echoes the operator's own apply triggers nothing.
Children are written with server-side apply; the status is merge-patched only when it changed;
Events are posted for each step and on condition transitions only.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import builders, kube, metrics
from . import status as st
from .config import Config
from .diagnose import metadata_of
from .memory import NO_GPU, PLANNING, REPLAN_FAILED_AFTER, MemoryPlan, memory_plan, plan_key
from .model import VLLMModel
from .plan import MANAGED_BY, Action, Apply, Event, Observed, Plan, plan_actions, plan_reconcile, transition_events

JSON = dict[str, Any]

__all__ = ["MANAGED_BY", "Plan", "Reconciler", "plan_actions", "plan_reconcile"]

_log = logging.getLogger(__name__)


EventSink = Callable[[Mapping[str, Any], Event], None]


def post_event(body: Mapping[str, Any], event: Event) -> None:
    """Post through kopf's event queue (it batches, retries and never raises into the handler)."""
    obj: Any = dict(body)  # kopf reads only apiVersion, kind and metadata from it
    try:
        kopf.event(obj, type=event.type, reason=event.reason, message=event.message[:1024])
    except LookupError:  # outside kopf's context (no event queue): nothing to post to
        pass


@dataclass
class _ModelState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: bool = False


class Reconciler:
    """Observes, plans and acts for VLLMModels; one reconcile at a time per model."""

    def __init__(
        self,
        client: kube.KubeClient,
        config: Config,
        *,
        planner: Callable[[VLLMModel, Config], Awaitable[MemoryPlan]] = memory_plan,
        events: EventSink = post_event,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
    ) -> None:
        self.client = client
        self.config = config
        self._planner = planner
        self._events = events
        self._clock = clock
        self._models: dict[tuple[str, str], _ModelState] = {}
        self._plans: dict[str, tuple[MemoryPlan, float]] = {}  # plan key -> (plan, when made)
        self._planning: dict[str, asyncio.Task[None]] = {}
        self._retries: dict[tuple[str, str], asyncio.TimerHandle] = {}
        # (namespace, model) -> (plural, child name) -> resourceVersion of the operator's own last write:
        # its watch echo tells the reconcile that wrote it nothing new, so it triggers no further reconcile.
        self._written: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
        # (namespace, model) -> (plural, name) -> the child's newest body from watch events and applies;
        # models in ``_read`` were read from the API once, so their children's absence here is real.
        self._children: dict[tuple[str, str], dict[tuple[str, str], JSON]] = {}
        self._read: set[tuple[str, str]] = set()

    async def observe(self, model: VLLMModel, *, fresh: bool = True) -> Observed:
        """The model's children: read from the API when ``fresh`` or the model was not read yet, else
        from what the watches and the operator's own applies reported since (``seen``)."""
        ns, labels = model.namespace, {builders.LABEL_MODEL: model.name, **MANAGED_BY}
        claim = model.cache_claim_name
        key = (ns, model.name)
        if fresh or key not in self._read:
            # The PVC may be shared or the user's (no model label): always read.
            pvc, jobs, pods, deployment, service = await asyncio.gather(
                self.client.get(kube.PVCS, ns, claim) if claim else _none(),
                self.client.list(kube.JOBS, ns, labels),
                self.client.list(kube.PODS, ns, labels),
                self.client.get(kube.DEPLOYMENTS, ns, builders.deployment_name(model)),
                self.client.get(kube.SERVICES, ns, builders.service_name(model)),
            )
            self._read.add(key)
            children = self._children.setdefault(key, {})
            for resource, objs in ((kube.JOBS, jobs), (kube.PODS, pods)):
                read = {(resource.plural, str(metadata_of(o).get("name"))) for o in objs}
                for gone in [k for k in children if k[0] == resource.plural and k not in read]:
                    del children[gone]
                for obj in objs:
                    self.seen(resource, ns, model.name, obj)
            named: tuple[tuple[kube.Resource, str, JSON | None], ...] = (
                (kube.DEPLOYMENTS, builders.deployment_name(model), deployment),
                (kube.SERVICES, builders.service_name(model), service),
            )
            for resource, name, found in named:
                if found is None:
                    children.pop((resource.plural, name), None)
                else:
                    self.seen(resource, ns, model.name, found)
        else:
            pvc = await self.client.get(kube.PVCS, ns, claim) if claim else None
            children = self._children.get(key, {})
            jobs = [o for (plural, _), o in children.items() if plural == kube.JOBS.plural]
            pods = [o for (plural, _), o in children.items() if plural == kube.PODS.plural]
            deployment = children.get((kube.DEPLOYMENTS.plural, builders.deployment_name(model)))
            service = children.get((kube.SERVICES.plural, builders.service_name(model)))
        memory = self._memory_plan(model)
        return Observed(
            now=self._clock(),
            pvc=pvc,
            jobs={str(j["metadata"]["name"]): j for j in jobs},
            pods=list(pods),
            deployment=deployment,
            service=service,
            memory=memory,
        )

    def seen(self, resource: kube.Resource, namespace: str, model: str, body: Mapping[str, Any], *,
             deleted: bool = False) -> None:
        """Record a child of ``model`` as a watch event or an apply reported it; an older report than the
        one kept (by resourceVersion) changes nothing."""
        if resource not in _KEPT:
            return
        meta = metadata_of(body)
        children = self._children.setdefault((namespace, model), {})
        key = (resource.plural, str(meta.get("name")))
        kept = children.get(key)
        version, kept_version = meta.get("resourceVersion"), metadata_of(kept or {}).get("resourceVersion")
        if deleted:
            if kept is not None and not _older(version, kept_version):
                del children[key]  # else re-created since: the newer one stays
        elif kept is None or not _older(version, kept_version):
            # managedFields: often the largest part of a body, and nothing the planner reads.
            children[key] = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}

    def _memory_plan(self, model: VLLMModel) -> MemoryPlan:
        """The model's memory plan if made, else PLANNING while it is made in the background (a thread:
        the event loop never waits); when done it triggers a reconcile. ``plan_reconcile`` creates nothing
        while planning."""
        if not model.spec.get("gpu"):
            return NO_GPU
        key = plan_key(model)
        loop = asyncio.get_running_loop()
        made = self._plans.get(key)
        stale = made is not None and made[0].status == st.UNKNOWN and loop.time() - made[1] > REPLAN_FAILED_AFTER
        if (made is None or stale) and key not in self._planning:
            self._planning[key] = loop.create_task(self._make_plan(key, model))
        return made[0] if made is not None else PLANNING

    async def _make_plan(self, key: str, model: VLLMModel) -> None:
        try:
            self._plans[key] = (await self._planner(model, self.config), asyncio.get_running_loop().time())
        finally:
            self._planning.pop(key, None)
        await self.trigger(model.namespace, model.name, _log)

    async def reconcile(
        self, namespace: str, name: str, logger: logging.Logger | kopf.Logger, *, fresh: bool = True
    ) -> str | None:
        """Reconcile one model now; its phase, or None when it is gone.

        Raises kopf.TemporaryError when the API fails in a way worth retrying, kopf.PermanentError for
        a spec that can never work as given.
        """
        state = self._models.setdefault((namespace, name), _ModelState())
        async with state.lock:
            state.pending = False  # from here on, a new event needs a new run
            started = asyncio.get_running_loop().time()
            try:
                phase = await self._reconcile(namespace, name, logger, fresh=fresh)
            except kopf.TemporaryError:
                metrics.record_reconcile("retry", asyncio.get_running_loop().time() - started)
                raise
            except Exception:
                metrics.record_reconcile("error", asyncio.get_running_loop().time() - started)
                raise
            metrics.record_reconcile("success", asyncio.get_running_loop().time() - started)
            metrics.set_phase(namespace, name, phase)
            return phase

    async def trigger(
        self,
        namespace: str,
        name: str,
        logger: logging.Logger | kopf.Logger,
        *,
        delay: float = 0.0,
        fresh: bool = True,
    ) -> None:
        """Reconcile on a child's or the resync's behalf: coalesced, retried later on failure.

        ``delay``: wait this long first, so that the burst of watch events one step causes (the
        operator's own writes, a Job and its Pod changing together) ends in one reconcile, not one each.
        ``fresh=False`` (a child's watch event): observe the children from what the watches reported.
        """
        state = self._models.setdefault((namespace, name), _ModelState())
        if state.pending:
            return  # a reconcile is already queued; it will read the newest state
        state.pending = True
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await self.reconcile(namespace, name, logger, fresh=fresh)
        except kopf.TemporaryError as exc:
            logger.info(f"{namespace}/{name}: {exc}; retrying in {exc.delay}s")
            self._retry_later(namespace, name, logger, float(exc.delay or 10))
        except kopf.PermanentError as exc:
            logger.warning(f"{namespace}/{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a child event must never crash the watcher
            logger.exception(f"{namespace}/{name}: reconcile failed: {exc}")
            self._retry_later(namespace, name, logger, 10.0)

    def _retry_later(self, namespace: str, name: str, logger: logging.Logger | kopf.Logger, delay: float) -> None:
        key = (namespace, name)
        if key in self._retries:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retries.pop(key, None)
            loop.create_task(self.trigger(namespace, name, logger))

        self._retries[key] = loop.call_later(delay, fire)

    def forget(self, namespace: str, name: str) -> None:
        self._models.pop((namespace, name), None)
        self._written.pop((namespace, name), None)
        self._children.pop((namespace, name), None)
        self._read.discard((namespace, name))
        handle = self._retries.pop((namespace, name), None)
        if handle is not None:
            handle.cancel()
        metrics.forget(namespace, name)

    def close(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for task in self._planning.values():
            task.cancel()

    async def _reconcile(
        self, namespace: str, name: str, logger: logging.Logger | kopf.Logger, *, fresh: bool
    ) -> str | None:
        body = await _api(self.client.get(kube.VLLMMODELS, namespace, name))
        if body is None or metadata_of(body).get("deletionTimestamp"):
            return None  # gone or going: owner references take the children with it
        try:
            model = VLLMModel.from_body(body)
        except ValueError as exc:
            await self._write_status(body, _invalid_spec_status(body, str(exc), self._clock()), logger)
            raise kopf.PermanentError(str(exc)) from exc
        observed = await _api(self.observe(model, fresh=fresh))
        plan = plan_reconcile(model, observed, self.config)
        for action in plan.actions:
            try:
                await self._act(model, action)
            except kube.ApiError as exc:
                if exc.retryable:
                    raise kopf.TemporaryError(f"{action}: {exc}", delay=2) from exc
                rejected = _rejected_status(model, plan.status, f"{action}: {exc.message}", self._clock())
                await self._write_status(body, rejected, logger)
                raise kopf.TemporaryError(f"{action}: {exc}", delay=60) from exc
            logger.info(f"{namespace}/{name}: {action}")
        for event in plan.events:
            self._events(body, event)
        await self._write_status(body, plan.status, logger)
        return str(plan.status.get("phase"))

    def is_own_write(self, resource: kube.Resource, namespace: str, model: str, body: Mapping[str, Any]) -> bool:
        """Whether a child's watch event only echoes this operator's last write of it (nothing new)."""
        meta = metadata_of(body)
        version = meta.get("resourceVersion")
        written = self._written.get((namespace, model), {})
        return version is not None and written.pop((resource.plural, str(meta.get("name"))), None) == str(version)

    async def _act(self, model: VLLMModel, action: Action) -> None:
        if isinstance(action, Apply):
            applied = await self.client.apply(action.obj)
            self.seen(kube.resource_of(action.obj), model.namespace, model.name, applied)
            written = metadata_of(applied)
            version = written.get("resourceVersion")
            if version is not None:
                child = (kube.resource_of(action.obj).plural, str(written.get("name")))
                self._written.setdefault((model.namespace, model.name), {})[child] = str(version)
        else:
            await self.client.delete(action.resource, action.namespace, action.name)
            self._children.get((model.namespace, model.name), {}).pop((action.resource.plural, action.name), None)

    async def _write_status(self, body: Mapping[str, Any], new: Mapping[str, Any], logger: Any) -> None:
        old = body.get("status") or {}
        patch = st.status_patch(old, new)
        if not patch:
            return
        meta = metadata_of(body)
        await _api(self.client.patch_status(kube.VLLMMODELS, str(meta["namespace"]), str(meta["name"]), patch))
        for event in transition_events(VLLMModel.from_body(body), old, new):
            self._events(body, event)


async def _none() -> None:
    return None


# Children kept from the watches (the PVC is always read: it may be shared or the user's).
_KEPT = (kube.JOBS, kube.PODS, kube.DEPLOYMENTS, kube.SERVICES)


def _older(version: Any, than: Any) -> bool:
    """Whether resourceVersion ``version`` is known to be older than ``than`` (they are opaque to clients,
    but etcd revisions in practice; where either is not a number, nothing is known to be older)."""
    try:
        return int(str(version)) < int(str(than))
    except ValueError:
        return False


async def _api(call: Awaitable[Any]) -> Any:
    """Await an API call; a retryable API failure becomes kopf.TemporaryError."""
    try:
        return await call
    except kube.ApiError as exc:
        if exc.retryable:
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        raise


def _invalid_spec_status(body: Mapping[str, Any], message: str, now: datetime.datetime) -> JSON:
    old = body.get("status") or {}
    generation = metadata_of(body).get("generation")
    failed = st.Condition(st.FAILED, st.TRUE, "InvalidSpec", message)
    status: JSON = {
        "phase": st.FAILED_PHASE,
        "message": message,
        "conditions": st.merge_conditions(old.get("conditions"), [failed], generation=generation, now=now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _rejected_status(model: VLLMModel, status: Mapping[str, Any], message: str, now: datetime.datetime) -> JSON:
    rejected = dict(status)
    failed = st.Condition(st.FAILED, st.TRUE, "Rejected", f"the API server rejected {message}")
    rejected["conditions"] = st.merge_conditions(
        status.get("conditions"), [failed], generation=model.generation, now=now
    )
    rejected["phase"], rejected["message"] = st.FAILED_PHASE, failed.message
    return rejected
