"""The reconcile engine (``reconcile.Reconciler``) with the watches under the test's control.

``FakeWatches`` is what kopf's indexes would hold; the test decides when each write's watch event
arrives (``deliver``), so the orders a real cluster can produce -- an echo before or after the next
reconcile, an object created and deleted between two reconciles -- are each played out.
``FakeApi`` is the API server: it answers writes with resourceVersions and can refuse them.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
from collections.abc import Iterable
from typing import Any

import pytest

from vllm_operator import kube
from vllm_operator.config import Config
from vllm_operator.plan import Event
from vllm_operator.reconcile import Key, Reconciler

NS = "ns"
JSON = dict[str, Any]
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def model_body(name: str = "m", **spec: Any) -> JSON:
    return {
        "apiVersion": "vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1, "resourceVersion": "1"},
        "spec": {"model": "org/tiny", "revision": "main", **spec},
        "status": {},
    }


class FakeApi:
    """Writes land here at once; what the watches report is up to ``FakeWatches.deliver``."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], JSON] = {}  # (plural, name) -> body
        self.versions = itertools.count(100)
        self.writes: list[tuple[str, str, str]] = []  # (verb, plural, name)
        self.events: list[Event] = []
        self.refuse: dict[str, kube.ApiError] = {}  # kind -> error every apply of it gets

    def _stamp(self, body: JSON) -> JSON:
        body.setdefault("metadata", {})["resourceVersion"] = str(next(self.versions))
        body["metadata"].setdefault("uid", f"uid-{body['metadata']['name']}")
        return body

    async def apply(self, obj: JSON) -> JSON:
        kind = str(obj["kind"])
        if kind in self.refuse:
            raise self.refuse[kind]
        resource = kube.resource_of(obj)
        self.writes.append(("apply", resource.plural, obj["metadata"]["name"]))
        body = self._stamp(copy.deepcopy(obj))
        self.objects[(resource.plural, obj["metadata"]["name"])] = body
        return copy.deepcopy(body)

    async def delete(self, resource: kube.Resource, namespace: str, name: str) -> bool:
        self.writes.append(("delete", resource.plural, name))
        return self.objects.pop((resource.plural, name), None) is not None

    async def get(self, resource: kube.Resource, namespace: str, name: str) -> JSON | None:
        self.writes.append(("get", resource.plural, name))
        found = self.objects.get((resource.plural, name))
        return copy.deepcopy(found) if found else None

    async def patch_status(self, resource: kube.Resource, namespace: str, name: str, patch: JSON) -> JSON:
        self.writes.append(("status", resource.plural, name))
        body = self.objects[(resource.plural, name)]
        status = body.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        self._stamp(body)
        return copy.deepcopy(body)

    async def post_event(self, regarding: JSON, event: Event) -> None:
        self.events.append(event)


class FakeWatches:
    """What kopf's indexes hold: only what was delivered."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.seen: dict[tuple[str, str], JSON] = {}

    def deliver(self, reconciler: Reconciler, *only: str) -> None:
        """The watch events of every write so far (or of the given plurals) arrive."""
        for (plural, name), body in list(self.api.objects.items()):
            if only and plural not in only:
                continue
            self.seen[(plural, name)] = copy.deepcopy(body)
            reconciler.saw(_resource(plural), (NS, "m" if plural != "vllmmodels" else name), body)
        for key in [k for k in self.seen if k not in self.api.objects and (not only or k[0] in only)]:
            body = self.seen.pop(key)
            reconciler.saw(_resource(key[0]), (NS, "m" if key[0] != "vllmmodels" else key[1]), body, deleted=True)

    def model(self, key: Key) -> JSON | None:
        found = self.seen.get(("vllmmodels", key[1]))
        return copy.deepcopy(found) if found else None

    def children(self, resource: kube.Resource, key: Key) -> Iterable[JSON]:
        return [copy.deepcopy(b) for (plural, _), b in self.seen.items() if plural == resource.plural]

    def models(self) -> Iterable[Key]:
        return [(NS, name) for plural, name in self.seen if plural == "vllmmodels"]


def _resource(plural: str) -> kube.Resource:
    return next(r for r in (kube.VLLMMODELS, kube.PVCS, kube.JOBS, kube.PODS, kube.DEPLOYMENTS, kube.SERVICES)
                if r.plural == plural)  # fmt: skip


def engine(**config: Any) -> tuple[FakeApi, FakeWatches, Reconciler]:
    api = FakeApi()
    watches = FakeWatches(api)
    reconciler = Reconciler(api, Config(**config), watches, clock=lambda: NOW)  # type: ignore[arg-type]
    body = model_body()
    api.objects[("vllmmodels", "m")] = body
    watches.seen[("vllmmodels", "m")] = copy.deepcopy(body)
    return api, watches, reconciler


def bind_pvc(api: FakeApi, watches: FakeWatches, reconciler: Reconciler) -> None:
    pvc = api.objects[("persistentvolumeclaims", "m-cache")]
    pvc["status"] = {"phase": "Bound"}
    api._stamp(pvc)
    watches.deliver(reconciler, "persistentvolumeclaims")


def applies(api: FakeApi) -> list[tuple[str, str]]:
    return [(plural, name) for verb, plural, name in api.writes if verb in ("apply", "delete")]


async def test_an_own_write_is_not_repeated_whether_its_watch_event_comes_before_or_after_the_next_reconcile() -> None:
    outcomes = []
    for echo_first in (False, True):
        api, watches, reconciler = engine()
        await reconciler.reconcile((NS, "m"))
        assert applies(api) == [("persistentvolumeclaims", "m-cache")]
        if echo_first:
            watches.deliver(reconciler)
        await reconciler.reconcile((NS, "m"))  # e.g. the model's status echo, before or after the PVC's
        await reconciler.reconcile((NS, "m"))
        watches.deliver(reconciler)
        await reconciler.reconcile((NS, "m"))
        outcomes.append((applies(api), [e.reason for e in api.events], api.objects[("vllmmodels", "m")]["status"]))
        await reconciler.close()
    assert outcomes[0] == outcomes[1]
    writes, events, _ = outcomes[0]
    assert len(set(writes)) == len(writes), f"each object applied once: {writes}"
    assert len(set(events)) == len(events), f"each Event posted once: {events}"


async def test_an_object_created_and_deleted_between_two_reconciles_is_created_again() -> None:
    api, watches, reconciler = engine()
    await reconciler.reconcile((NS, "m"))
    watches.deliver(reconciler)  # ADDED ...
    del api.objects[("persistentvolumeclaims", "m-cache")]
    watches.deliver(reconciler)  # ... then DELETED (by hand), before any reconcile ran
    await reconciler.reconcile((NS, "m"))
    assert applies(api) == [("persistentvolumeclaims", "m-cache")] * 2


async def test_a_reconcile_reads_nothing_from_the_api_for_its_own_children() -> None:
    api, watches, reconciler = engine()
    for _ in range(3):
        await reconciler.reconcile((NS, "m"))
        watches.deliver(reconciler)
        if ("persistentvolumeclaims", "m-cache") in api.objects:
            bind_pvc(api, watches, reconciler)
    assert [w for w in api.writes if w[0] == "get"] == []
    assert ("jobs", next(n for p, n in applies(api) if p == "jobs")) in applies(api)


async def test_a_user_claim_is_read_because_no_watch_carries_it() -> None:
    api, watches, reconciler = engine()
    api.objects[("vllmmodels", "m")]["spec"]["cache"] = {"existingClaim": "shared"}
    watches.deliver(reconciler, "vllmmodels")
    await reconciler.reconcile((NS, "m"))
    assert ("get", "persistentvolumeclaims", "shared") in api.writes
    assert api.objects[("vllmmodels", "m")]["status"]["conditions"]  # PVCNotFound shows in the status


async def test_a_transient_refusal_leaves_the_status_alone_then_surfaces_with_the_servers_message() -> None:
    api, watches, reconciler = engine(surface_failures_after_seconds=3600)
    api.refuse["PersistentVolumeClaim"] = kube.ApiError(500, "InternalError", "service IP range is full")
    await reconciler.reconcile((NS, "m"))
    assert api.objects[("vllmmodels", "m")]["status"] == {}, "no claim about a write that did not happen"
    assert reconciler.queue.failures((NS, "m")) == 1
    await reconciler.close()

    api, watches, reconciler = engine(surface_failures_after_seconds=0)
    api.refuse["PersistentVolumeClaim"] = kube.ApiError(500, "InternalError", "service IP range is full")
    await reconciler.reconcile((NS, "m"))
    status = api.objects[("vllmmodels", "m")]["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["status"], failed["reason"]) == ("Failed", "True", "ApiUnavailable")
    assert "service IP range is full" in failed["message"] and "PersistentVolumeClaim/m-cache" in failed["message"]
    assert [e.reason for e in api.events if e.type == "Warning"] == ["ApiUnavailable"]
    await reconciler.close()


async def test_a_refusal_retrying_cannot_fix_surfaces_at_once_and_the_next_success_clears_it() -> None:
    api, watches, reconciler = engine(surface_failures_after_seconds=3600)
    api.refuse["PersistentVolumeClaim"] = kube.ApiError(422, "Invalid", "spec.resources: field not declared in schema")
    await reconciler.reconcile((NS, "m"))
    failed = next(c for c in api.objects[("vllmmodels", "m")]["status"]["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "ApiRejected")
    assert "field not declared in schema" in failed["message"]
    del api.refuse["PersistentVolumeClaim"]
    watches.deliver(reconciler)
    await reconciler.reconcile((NS, "m"))
    failed = next(c for c in api.objects[("vllmmodels", "m")]["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "False"
    assert reconciler.queue.failures((NS, "m")) == 0
    await reconciler.close()


async def test_an_unknown_error_is_a_permanent_internal_error_with_its_cause_and_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm_operator import reconcile

    def broken(*_: Any) -> Any:
        raise KeyError("spec.gpu.count")

    monkeypatch.setattr(reconcile, "plan_reconcile", broken)
    api, watches, reconciler = engine()
    await reconciler.reconcile((NS, "m"))
    status = api.objects[("vllmmodels", "m")]["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InternalError" and "KeyError" in failed["message"] and "spec.gpu.count" in failed["message"]
    assert reconciler.queue.failures((NS, "m")) == 0
    assert (NS, "m") not in reconciler.queue._timers, "no retry, no resync timer: it waits for a change"
    await reconciler.close()


async def test_nothing_is_kept_for_deleted_models_even_when_late_events_arrive() -> None:
    api, watches, reconciler = engine(reconcile_interval_seconds=3600)
    keys = [(NS, f"m{i}") for i in range(300)]
    for _, name in keys:
        body = model_body(name, gpu={"type": "L4"})
        api.objects[("vllmmodels", name)] = body
        watches.seen[("vllmmodels", name)] = copy.deepcopy(body)

    async def never_done(*_: Any) -> Any:
        await asyncio.Event().wait()

    reconciler._planner = never_done  # plans in flight when the models go
    for key in keys:
        await reconciler.reconcile(key)
    assert reconciler.tracked() >= len(keys)
    for _, name in keys:
        del api.objects[("vllmmodels", name)]
        watches.seen.pop(("vllmmodels", name))
    for key in keys:  # late events of the deleted models (their status echo, a child's DELETED)
        reconciler.saw(kube.VLLMMODELS, key, {"metadata": {"name": key[1], "resourceVersion": "999"}})
        await reconciler.reconcile(key)
    assert reconciler.tracked() == 0
    await reconciler.close()
