"""Reconcile one VLLMModel: look at its actual state, plan (``plan.plan_reconcile``, pure), act, write status.

The engine, and why it is shaped so:

- **State comes from kopf's watches.** kopf keeps one watch per kind (VLLMModels, and the operator's
  PVCs, Jobs, Pods, Deployments and Services, filtered by label on the server) and feeds
  ``@kopf.index`` handlers (``handlers.py``); the indexes hold each object's newest body and drop it
  when the object is deleted. A reconcile reads no child from the API: the only read it may make is a
  PVC the user owns (``spec.cache.existingClaim`` or ``pvc://``), which carries none of our labels.
- **One explicit work queue decides when a model is reconciled** (``workqueue.py``). kopf retries a
  handler for the object whose event triggered it, but a model must also be reconciled when its Job or
  Pod changes, which kopf can only route to the parent by writing to it. So every trigger -- the model's
  own events, a child's events, the plan's time-based rules (``Plan.requeue_after``), retries, the
  periodic resync -- is one ``add`` of the model's key; the queue deduplicates, runs one reconcile per
  model at a time, and backs retries off exponentially with a cap and jitter. kopf's own handler retries
  are not used (the handlers never fail), so there is exactly one retry path.
- **Own writes are read back at once** ("expectations", as Kubernetes' own controllers keep them): an
  object the operator has just applied or deleted is seen as written until its watch event catches up,
  so a reconcile that runs before the event arrives neither repeats the write nor posts its Event again,
  and the status never steps back.
- **Every action is tried, and the status is always written.** A write the API server refuses no longer
  hides the others' results: the refusal shows as ``Failed`` (reason ``ApiRejected`` with the server's
  message) at once when retrying cannot help, and after ``Config.surface_failures_after_seconds`` when
  it is transient (before that the status is left as it was, so it never claims what the failed write
  would have made true); retries continue with backoff.
- **Nothing outlives its model.** Per-model entries (expectations, memory plans, backoff, timers) are
  dropped when a reconcile finds the model gone; a late child event of a deleted model costs one
  look-up in the index and leaves nothing behind.
- **Errors are types.** ``kube.ApiError`` knows whether retrying helps; a spec the operator cannot read is
  ``InvalidSpec`` (no retry: the next spec change reconciles); any other exception is a bug, reported
  as ``Failed/InternalError`` with its type and message and not retried.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import builders, kube, lora, metrics, replicas
from . import status as st
from .apis import OPTIONAL_APIS, OptionalApis
from .config import Config
from .diagnose import metadata_of
from .memory import NO_GPU, PLANNING, REPLAN_FAILED_AFTER, MemoryPlan, memory_plan, planning_key
from .model import VLLMModel
from .pod_reports import PodReports, is_ready_server
from .plan import MANAGED_BY, Action, Apply, Event, Observed, Plan, plan_reconcile, transition_events
from .plan.autoscaling_step import wanted_apis
from .workqueue import Backoff, WorkQueue

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, model name)

__all__ = ["MANAGED_BY", "ClusterState", "Plan", "Reconciler"]

_log = logging.getLogger(__name__)

# The kinds whose objects the watches carry for a model, by plural. The optional APIs (autoscalers,
# InferencePool) may be absent from a cluster: kopf then watches nothing for them (``apis`` says how).
WATCHED_CHILDREN = (kube.PVCS, kube.JOBS, kube.PODS, kube.DEPLOYMENTS, kube.SERVICES, kube.CONFIGMAPS,
                    kube.STATEFULSETS, kube.PDBS, kube.NETWORKPOLICIES, *OPTIONAL_APIS)  # fmt: skip


class ClusterState(Protocol):
    """What the watches know (``handlers.IndexedState`` reads kopf's indexes)."""

    def model(self, key: Key) -> JSON | None: ...

    def children(self, resource: kube.Resource, key: Key) -> Iterable[JSON]: ...

    def models(self) -> Iterable[Key]: ...


EventSink = Callable[[Mapping[str, Any], Event], Awaitable[None]]

_DELETED: JSON = {}  # an expectation: the operator deleted this object; its DELETED event is due


@dataclass
class _Expectations:
    """The operator's own writes of one model's objects that the watches have not reported yet."""

    written: dict[tuple[str, str], JSON] = field(default_factory=dict)  # (plural, name) -> body or _DELETED
    failing_since: float | None = None  # loop time of the first failed write of the current streak


def _version(body: Mapping[str, Any] | None) -> int | None:
    try:
        return int(str(metadata_of(body or {}).get("resourceVersion")))
    except ValueError:
        return None


def _newest(indexed: JSON | None, own: JSON | None) -> tuple[JSON | None, bool]:
    """The body to believe, and whether the expectation ``own`` is still ahead of the index."""
    if own is None:
        return indexed, False
    if own is _DELETED:
        return (None, True) if indexed is not None else (None, False)
    if indexed is None:
        return own, True
    seen, mine = _version(indexed), _version(own)
    if seen is not None and mine is not None and mine > seen:
        return own, True
    return indexed, False


class Reconciler:
    """Observes (from ``state``), plans and acts for VLLMModels; driven by one ``WorkQueue``."""

    def __init__(
        self,
        client: kube.KubeClient,
        config: Config,
        state: ClusterState,
        *,
        planner: Callable[[VLLMModel, Config], Awaitable[MemoryPlan]] = memory_plan,
        events: EventSink | None = None,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
        apis: OptionalApis | None = None,
        pod_reports: PodReports | None = None,
    ) -> None:
        self.client = client
        self.apis = apis or OptionalApis(client, fixed_watches=False)
        self.config = config
        self.state = state
        self._planner = planner
        self._events: EventSink = events or client.post_event
        self._clock = clock
        self.queue: WorkQueue[Key] = WorkQueue(
            self.reconcile,
            workers=config.reconcile_workers,
            backoff=Backoff(config.retry_base_delay_seconds, config.retry_max_delay_seconds),
        )
        self._expected: dict[Key, _Expectations] = {}
        self._plans: dict[Key, tuple[str, MemoryPlan, float]] = {}  # key -> (plan key, plan, loop time made)
        self._planning: dict[Key, tuple[str, asyncio.Task[None]]] = {}
        # spec.adapters: each ready server pod's /status, read in the background (never on this path).
        self.pod_reports = pod_reports or PodReports()
        self.pod_reports.on_change = self.queue.add

    # --- the state one reconcile sees ----------------------------------------------------------------

    def _own(self, key: Key) -> _Expectations:
        return self._expected.setdefault(key, _Expectations())

    def _merged(self, key: Key, resource: kube.Resource, indexed: Iterable[JSON]) -> dict[str, JSON]:
        """The children of ``resource`` by name: the index, with the operator's unreported writes over it."""
        by_name = {str(metadata_of(o).get("name")): o for o in indexed}
        expected = self._expected.get(key)
        if expected is None:
            return by_name
        for (plural, name), own in list(expected.written.items()):
            if plural != resource.plural:
                continue
            body, ahead = _newest(by_name.get(name), own)
            if not ahead:
                del expected.written[(plural, name)]
            if body is None:
                by_name.pop(name, None)
            else:
                by_name[name] = body
        return by_name

    def saw(self, resource: kube.Resource, key: Key, body: Mapping[str, Any], *, deleted: bool = False) -> bool:
        """A watch event of one of ``key``'s objects: the expectation it meets is met. True when the event
        is exactly the operator's own write coming back (same resourceVersion): nothing new to react to.

        Events of one object arrive in order on its kind's watch, so an event at or after the version
        the operator wrote (or the object's DELETED event) means the index has caught up with that write.
        """
        expected = self._expected.get(key)
        if expected is None:
            return False
        child = (resource.plural, str(metadata_of(body).get("name")))
        own = expected.written.get(child)
        if own is None:
            return False
        seen, mine = _version(body), _version(own)
        if own is _DELETED:
            met = deleted
        else:
            met = deleted or seen is None or mine is None or seen >= mine
        if met:
            del expected.written[child]
        return met and not deleted and own is not _DELETED and seen is not None and seen == mine

    def model_body(self, key: Key) -> JSON | None:
        indexed = self.state.model(key)
        expected = self._expected.get(key)
        own = expected.written.get((kube.VLLMMODELS.plural, key[1])) if expected is not None else None
        body, ahead = _newest(indexed, own)
        if not ahead and expected is not None:
            expected.written.pop((kube.VLLMMODELS.plural, key[1]), None)
        return body if indexed is not None else None  # the index alone says whether the model exists

    async def observe(self, model: VLLMModel) -> Observed:
        key = (model.namespace, model.name)
        children = {r.plural: self._merged(key, r, self.state.children(r, key)) for r in WATCHED_CHILDREN}
        claim = model.cache_claim_name
        pvc = children[kube.PVCS.plural].get(claim) if claim else None
        if claim and pvc is None and not model.owns_cache_pvc:
            pvc = await self.client.get(kube.PVCS, model.namespace, claim)  # the user's: not on our watch
        plain_deployment = children[kube.DEPLOYMENTS.plural].get(builders.deployment_name(model))
        statefulset = children[kube.STATEFULSETS.plural].get(replicas.statefulset_name(model))
        workload = statefulset if model.per_replica else plain_deployment
        wanted = wanted_apis(model)
        missing, unwatched = await self.apis.check(wanted) if wanted else (frozenset(), frozenset())
        return Observed(
            now=self._clock(),
            pvc=pvc,
            jobs=children[kube.JOBS.plural],
            pods=list(children[kube.PODS.plural].values()),
            deployment=workload,
            service=children[kube.SERVICES.plural].get(builders.service_name(model)),
            claims=children[kube.PVCS.plural],
            statefulset=statefulset,
            plain_deployment=plain_deployment,
            siblings_service=children[kube.SERVICES.plural].get(replicas.siblings_service_name(model)),
            network_policy=children[kube.NETWORKPOLICIES.plural].get(replicas.siblings_service_name(model)),
            disruption_budget=children[kube.PDBS.plural].get(model.name),
            memory=self._memory_plan(key, model),
            config_map=children[kube.CONFIGMAPS.plural].get(lora.config_map_name(model)),
            adapter_reports=self._adapter_reports(key, model, children[kube.PODS.plural].values()),
            scaled_objects=children[kube.SCALEDOBJECTS.plural],
            hpas=children[kube.HPAS.plural],
            inference_pools=children[kube.INFERENCEPOOLS.plural],
            missing_apis=missing,
            unwatched_apis=unwatched,
        )

    def _adapter_reports(self, key: Key, model: VLLMModel, pods: Iterable[JSON]) -> dict[str, JSON]:
        if not lora.enabled(model) or not lora.adapters_of(model):
            self.pod_reports.forget(key)
            return {}
        return self.pod_reports.snapshot(key, [p for p in pods if is_ready_server(p)])

    # --- the memory plan, made in the background -----------------------------------------------------

    def _memory_plan(self, key: Key, model: VLLMModel) -> MemoryPlan:
        """The model's memory plan if made for its current inputs, else PLANNING while it is being made
        (in a thread: the event loop never waits); when done the model is queued again."""
        if not model.spec.get("gpu"):
            self._plans.pop(key, None)
            return NO_GPU
        wanted = planning_key(model)
        loop = asyncio.get_running_loop()
        made = self._plans.get(key)
        current = made is not None and made[0] == wanted
        stale = current and made is not None and made[1].status == st.UNKNOWN and (
            loop.time() - made[2] > REPLAN_FAILED_AFTER)  # fmt: skip
        planning = self._planning.get(key)
        if (not current or stale) and (planning is None or planning[0] != wanted):
            if planning is not None:
                planning[1].cancel()
            self._planning[key] = (wanted, loop.create_task(self._make_plan(key, wanted, model)))
        if current and made is not None:
            if made[1].status == st.UNKNOWN:
                self.queue.add_after(key, REPLAN_FAILED_AFTER)
            return made[1]
        return PLANNING

    async def _make_plan(self, key: Key, wanted: str, model: VLLMModel) -> None:
        try:
            plan = await self._planner(model, self.config)
        finally:
            if self._planning.get(key, ("", None))[0] == wanted:
                del self._planning[key]
        if self.state.model(key) is not None:  # a plan for a model deleted meanwhile is not kept
            self._plans[key] = (wanted, plan, asyncio.get_running_loop().time())
            self.queue.add(key)

    # --- one reconcile ---------------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        """Reconcile one model (the work queue's callback): never raises; queues its own retries."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        body = self.model_body(key)
        if body is None or metadata_of(body).get("deletionTimestamp"):
            self.forget(key)  # gone or going: owner references take the children with it
            return
        try:
            result = await self._reconcile(key, body)
        except kube.ApiError as exc:  # reading or writing the status failed: nothing else to report to
            result = "retry"
            delay = self.queue.retry(key)
            _log.info(f"{key[0]}/{key[1]}: {exc}; retrying in {delay:.1f}s")
        except Exception as exc:  # noqa: BLE001 - a bug: report it as such, once, and do not loop on it
            result = "error"
            _log.exception(f"{key[0]}/{key[1]}: internal error")
            await self._report_internal_error(key, body, exc)
        metrics.record_reconcile(result, loop.time() - started)
        if result != "error":  # level-triggered safety net; an internal error waits for a change instead
            self.queue.add_after(key, max(1.0, self.config.reconcile_interval_seconds))

    async def _reconcile(self, key: Key, body: JSON) -> str:
        try:
            model = VLLMModel.from_body(body)
        except ValueError as exc:
            await self._write_status(key, body, _failed_status(body, "InvalidSpec", str(exc), self._clock()))
            self.queue.forget(key)
            metrics.set_phase(*key, st.FAILED_PHASE)
            return "invalid"
        observed = await self.observe(model)
        plan = plan_reconcile(model, observed, self.config)
        refused: list[tuple[Action, kube.ApiError]] = []
        for action in plan.actions:
            try:
                await self._act(key, action)
            except kube.ApiError as exc:
                if exc.not_found and await self._api_gone(action):
                    self.queue.add_after(key, 1.0)  # the next plan reports it in its condition
                    continue
                refused.append((action, exc))
            else:
                _log.info(f"{key[0]}/{key[1]}: {action}")
        status = plan.status
        expected = self._own(key)
        if refused:
            loop_now = asyncio.get_running_loop().time()
            if expected.failing_since is None:
                expected.failing_since = loop_now
            lasting = loop_now - expected.failing_since >= self.config.surface_failures_after_seconds
            permanent = any(not exc.retryable for _, exc in refused)
            delay = self.queue.retry(key)
            message = "; ".join(f"{action}: {exc.status} {exc.reason}: {exc.message}" for action, exc in refused)
            _log.warning(f"{key[0]}/{key[1]}: the API server refused {message}; retrying in {delay:.1f}s")
            if not (permanent or lasting):
                return "retry"  # the status stays as it was: the plan's would claim what did not happen
            status = _refused_status(model, status, refused, self._clock())
        else:
            expected.failing_since = None
            self.queue.forget(key)
            for event in plan.events:
                await self._events(body, event)
            requeue_after: float | None = getattr(plan, "requeue_after", None)
            if requeue_after is not None:
                self.queue.add_after(key, requeue_after)
        await self._write_status(key, body, status)
        metrics.set_phase(*key, str(status.get("phase")))
        metrics.set_adapters(*key, status.get("adapters"))
        metrics.set_autoscaling(*key, status.get("autoscaling"))
        return "retry" if refused else "success"

    async def _api_gone(self, action: Action) -> bool:
        """A write answered 404: True when its kind is an optional API the cluster no longer serves."""
        resource = kube.resource_of(action.obj) if isinstance(action, Apply) else action.resource
        return resource in OPTIONAL_APIS and not await self.apis.recheck(resource)

    async def _act(self, key: Key, action: Action) -> None:
        expected = self._own(key)
        if isinstance(action, Apply):
            applied = await self.client.apply(action.obj)
            expected.written[(kube.resource_of(action.obj).plural, str(metadata_of(applied).get("name")))] = (
                kube.slim(applied))  # fmt: skip
        else:
            await self.client.delete(action.resource, action.namespace, action.name)
            expected.written[(action.resource.plural, action.name)] = _DELETED

    async def _write_status(self, key: Key, body: JSON, new: Mapping[str, Any]) -> None:
        old = body.get("status") or {}
        patch = st.status_patch(old, new)
        if not patch:
            return
        written = await self.client.patch_status(kube.VLLMMODELS, key[0], key[1], patch)
        self._own(key).written[(kube.VLLMMODELS.plural, key[1])] = kube.slim(written)
        try:
            model = VLLMModel.from_body(body)
        except ValueError:
            if st.transitioned_to(old.get("conditions") or [], new.get("conditions") or [], st.FAILED, st.TRUE):
                await self._events(body, Event("Warning", "InvalidSpec", str(new.get("message"))))
            return
        for event in transition_events(model, old, new):
            await self._events(body, event)

    async def _report_internal_error(self, key: Key, body: JSON, exc: Exception) -> None:
        self.queue.forget(key)
        message = (f"internal error: {type(exc).__name__}: {exc}; the operator will try again on the next "
                   "change of this model or its children; please report it with the operator's log")  # fmt: skip
        try:
            await self._write_status(key, body, _failed_status(body, "InternalError", message, self._clock()))
        except Exception:  # noqa: BLE001 - the error is logged above; the status is best effort here
            _log.exception(f"{key[0]}/{key[1]}: cannot write the internal error to the status")

    # --- lifetime --------------------------------------------------------------------------------------

    def forget(self, key: Key) -> None:
        """Drop everything kept for a model that is gone."""
        self._expected.pop(key, None)
        self._plans.pop(key, None)
        planning = self._planning.pop(key, None)
        if planning is not None:
            planning[1].cancel()
        self.queue.drop(key)
        self.pod_reports.forget(key)
        metrics.forget(*key)

    def resync(self) -> None:
        """Queue every model the watches know: what no event announced still converges. No API call."""
        for key in list(self.state.models()):
            self.queue.add(key)

    def tracked(self) -> int:
        """Models with per-model state in memory (the benchmarks and tests check it returns to 0)."""
        kept = set(self._expected) | set(self._plans) | set(self._planning) | self.pod_reports.tracked()
        return len(kept) + len(self.queue)

    async def close(self) -> None:
        await self.queue.stop()
        for _, task in self._planning.values():
            task.cancel()
        self._planning.clear()
        await self.pod_reports.close()


def _failed_status(body: Mapping[str, Any], reason: str, message: str, now: datetime.datetime) -> JSON:
    """The status of a model that cannot be planned at all (unreadable spec, internal error)."""
    old = body.get("status") or {}
    generation = metadata_of(body).get("generation")
    failed = st.Condition(st.FAILED, st.TRUE, reason, message)
    stalled = st.Condition(st.STALLED, st.TRUE, reason, message)
    status: JSON = {
        "phase": st.FAILED_PHASE,
        "message": message,
        "conditions": st.merge_conditions(old.get("conditions"), [failed, stalled], generation=generation, now=now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _refused_status(
    model: VLLMModel, status: Mapping[str, Any], refused: list[tuple[Action, kube.ApiError]], now: datetime.datetime
) -> JSON:
    """The plan's status with the API server's refusals as the failure: what was refused and why."""
    message = "the API server refused " + "; ".join(
        f"{action}: {exc.status} {exc.reason}: {exc.message}" for action, exc in refused
    )
    reason = "ApiRejected" if any(not exc.retryable for _, exc in refused) else "ApiUnavailable"
    failed = st.Condition(st.FAILED, st.TRUE, reason, message[:2048])
    stalled = st.Condition(st.STALLED, st.TRUE, reason, failed.message)
    result = dict(status)
    result["conditions"] = st.merge_conditions(status.get("conditions"), [failed, stalled],
                                               generation=model.generation, now=now)  # fmt: skip
    result["phase"], result["message"] = st.FAILED_PHASE, failed.message
    return result
