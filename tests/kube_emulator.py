"""kmock's KubernetesEmulator plus what the operator tests need from a cluster and kmock lacks.

kmock (by kopf's author) serves a stateful in-memory Kubernetes API over HTTP: create/get/list/watch,
merge PATCH, DELETE with finalizers, Kubernetes-style errors. ``KubeEmulator`` adds, and says here what
stands in for what:

- **Object metadata** (the API server): ``uid``, ``creationTimestamp``, ``resourceVersion`` and
  ``namespace`` on create; ``generation`` starts at 1 and grows when ``spec`` changes.
- **Server-side apply**: a PATCH with ``application/apply-patch+yaml`` creates the object when it is
  missing and otherwise merges it like a merge patch (no field ownership, no removal of fields a
  manager stopped setting; lists are replaced).
- **Status subresource**: a PATCH on ``.../status`` changes only ``status``; a PATCH on the object
  itself leaves ``status`` alone.
- **Owner-reference garbage collection** (kube-controller-manager's garbage collector): when an object
  is gone, objects whose ownerReferences name its uid go too, transitively (background propagation);
  an object created with owners that are all gone already is collected too.
- **A Job controller**: a new Job gets ``status.active`` and a Pod (labelled ``job-name``, owned by the
  Job); then, unless the test holds it, the Pod terminates with the termination message of a
  ``CacheOutcome`` (the one-line JSON the real ``vllm-runtime cache`` writes) and the Job completes or
  fails. The default outcome is success with a commit derived from model and revision.
- **A Deployment controller**: a new or changed Deployment gets ``status`` (observedGeneration,
  replicas, updatedReplicas, readyReplicas) as if all its pods became ready at once
  (``deployments_ready = False`` keeps them unready). No ReplicaSets or model pods are emulated.
- **A PVC binder**: new PVCs become ``Bound`` (``bind_pvcs = False`` leaves them ``Pending``).
- **Faults that reject**: a ``Fault`` fed into a kmock reaction (``emu[...] << Fault(2, 500)``) answers
  with a Kubernetes error, and while it is armed the request does not change the stored state -- as
  a real API server that refuses a write. (kmock by itself applies writes even when a reaction
  answers them.) ``drop_watches`` closes live watch connections, as an API server restart would.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import hashlib
import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import attrs
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal.rendering import ReactionMismatchError

from vllm_operator import crd

VLLMMODELS = kmock.resource(crd.GROUP, crd.VERSION, crd.PLURAL)
JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PVCS = kmock.resource("", "v1", "persistentvolumeclaims")
EVENTS = kmock.resource("", "v1", "events")


def commit_for(model: str, revision: str) -> str:
    """The commit the emulated Hub resolves ``model@revision`` to."""
    return hashlib.sha1(f"{model}@{revision}".encode()).hexdigest()


@dataclass(frozen=True)
class CacheOutcome:
    """What the emulated ``vllm-runtime cache`` pod reports in its termination message."""

    ok: bool = True
    commit: str | None = None  # None: commit_for(model, revision)
    reason: str | None = None
    message: str | None = None
    bytes: int = 5 * 2**20
    files: int = 4
    plan: dict[str, Any] | None = None  # the memory plan a ``--plan-*`` cache run reports
    # Set: the Job's outcome is reported first and its pod's termination message only once this is set
    # (the Job and Pod watches are separate streams; a real cluster can deliver them in either order).
    pod_report: asyncio.Event | None = field(default=None, compare=False)

    def summary(self, model: str, revision: str) -> dict[str, Any]:
        base = {"command": "cache", "model": model, "revision": revision}
        if self.ok:
            extra = {} if self.plan is None else {"plan": self.plan}
            return {**base, "ok": True, "commit": self.commit or commit_for(model, revision), "bytes": self.bytes,
                    "files": self.files, "verified": True, "completedAt": _now(), "durationSeconds": 1.5, **extra}  # fmt: skip
        return {**base, "ok": False, "reason": self.reason, "message": self.message, "retryable": False}


HOLD = None  # an outcome of None keeps the cache Job running until ``finish_job``


class Fault:
    """A kmock payload answering ``times`` requests with a Kubernetes error, then stepping aside."""

    def __init__(self, times: int, status: int = 500, reason: str = "InternalError") -> None:
        self.left = times
        self.status = status
        self.reason = reason
        self.served = 0

    @property
    def armed(self) -> bool:
        return self.left > 0

    def __call__(self, request: kmock.Request) -> Any:
        if self.left <= 0:
            raise ReactionMismatchError  # kmock: this reaction is depleted, the next one answers
        self.left -= 1
        self.served += 1
        return kmock.KubernetesError(status=self.status, reason=self.reason, message=f"injected {self.status}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args else ""


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    outcomes: dict[str, CacheOutcome | None] = attrs.field(factory=dict)  # by revision; missing: success
    deployments_ready: bool = True
    bind_pvcs: bool = True

    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.resources[VLLMMODELS] = kmock.ResourceInfo(
            kind=crd.KIND, singular=crd.SINGULAR, namespaced=True, shortnames=set(crd.SHORT_NAMES),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"}, subresources={"status", "scale"},
        )  # fmt: skip

    # --- reading the state, for assertions ----------------------------------------------------------

    def read(self, resource: kmock.resource, namespace: str, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def names(self, resource: kmock.resource, namespace: str) -> list[str]:
        return sorted(
            name
            for (res, ns, name), obj in self.objects.items()
            if res == resource and ns == namespace and not obj.deleted
        )

    # --- changing the state as a cluster component would ------------------------------------------

    async def put(self, resource: kmock.resource, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge ``patch`` into an object (creating it if missing) and tell the watchers."""
        async with self._lock:
            key = (resource, namespace, name)
            if key in self.objects and not self.objects[key].deleted:
                self.objects[key].patch(patch)
                kind = "MODIFIED"
            else:
                meta = {"uid": str(uuid.uuid4()), "creationTimestamp": _now(), "name": name, "namespace": namespace}
                self.objects[key] = kmock_dicts.patch_dict({"metadata": meta}, patch)
                kind = "ADDED"
            self.objects[key].patch({"metadata": {"resourceVersion": str(next(self._versions))}})
            await self._buses[resource].put({"type": kind, "object": self.objects[key].raw})

    async def remove(self, resource: kmock.resource, namespace: str, name: str) -> None:
        """Delete an object (and its dependents) as ``kubectl delete`` would, bypassing faults."""
        async with self._write_lock:
            uid = await self._drop(resource, namespace, name)
            if uid:
                await self._collect_garbage({uid})

    async def finish_job(self, namespace: str, name: str, outcome: CacheOutcome) -> None:
        """Let a held cache Job's pod terminate with ``outcome``."""
        await self.settle()  # the Job controller has started the Job and its pod
        job = self.read(JOBS, namespace, name)
        assert job is not None, f"no Job {namespace}/{name}"
        await self._finish_job(job, outcome)

    async def set_deployment_ready(self, namespace: str, name: str, ready: int) -> None:
        await self.put(DEPLOYMENTS, namespace, name, {"status": {"readyReplicas": ready, "availableReplicas": ready}})

    def drop_watches(self, resource: kmock.resource) -> int:
        """Close every live watch connection on ``resource``; the number closed."""
        closed = 0
        for request in list(self._requests):
            if request.action == kmock.action.WATCH and request.resource == resource:
                raw = request._raw_request
                if raw is not None and raw.transport is not None and not raw.transport.is_closing():
                    raw.transport.close()
                    closed += 1
        return closed

    def forget_requests(self) -> None:
        """Drop the recorded requests except live watches.

        kmock matches each request against its reactions by scanning the recorded ones, so a long
        history slows every request down; tests sharing one emulator call this between them.
        """
        self._requests[:] = [r for r in self._requests if r.action == kmock.action.WATCH]

    async def settle(self) -> None:
        """Wait for the emulated controllers' pending reactions."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aexit__(self, *exc: Any) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().__aexit__(*exc)

    # --- the request pipeline ------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        if self._faulted(request):
            return await kmock.RawHandler._handle(self, request)  # the fault answers; the state stays
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)
        async with self._write_lock:
            key = (request.resource, request.namespace, request.name)
            before = self.read(request.resource, request.namespace or "", request.name or "") if request.name else None
            request = self._prepare(request, before)
            response = await super()._handle(request)
            after_key = key if request.name else (request.resource, request.namespace, _name_of(request.data))
            after = self.read(*after_key) if after_key[2] else None  # type: ignore[arg-type]
            if before is not None and after is None:  # gone now: collect its dependents
                await self._collect_garbage({before["metadata"].get("uid")})
            if after is not None and response.status < 400:
                self._react(request.resource, after, before)
            return response

    def _faulted(self, request: kmock.Request) -> bool:
        for reaction in self._payloads:
            fault = reaction.response.payload
            if isinstance(fault, Fault) and fault.armed and not reaction._disabled.is_set():
                if request in reaction._source:
                    return True
        return False

    def _prepare(self, request: kmock.Request, before: dict[str, Any] | None) -> kmock.Request:
        data = request.data if isinstance(request.data, dict) else None
        content_type = request.headers.get("Content-Type", "")
        if request.action == kmock.action.UPDATE and "apply-patch" in content_type and before is None:
            created = attrs.evolve(request, action=kmock.action.CREATE)  # server-side apply creates
            # kmock matches reactions by the identity of recorded requests: record the new one instead.
            self._requests[:] = [created if r is request else r for r in self._requests]
            request = created
        if data is None:
            return request
        meta = data.setdefault("metadata", {})
        if request.action == kmock.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
        elif request.action == kmock.action.UPDATE and before is not None:
            if request.subresource == "status":
                for key in list(data):
                    if key not in ("status", "metadata"):
                        del data[key]
                data["metadata"] = meta = {}
            else:
                data.pop("status", None)
                merged = kmock_dicts.patch_dict(copy.deepcopy(before), data)
                if merged.get("spec") != before.get("spec"):
                    meta["generation"] = int(before["metadata"].get("generation") or 1) + 1
                for field in ("uid", "creationTimestamp", "namespace", "name"):
                    meta.pop(field, None)  # immutable
        if request.action != kmock.action.DELETE:
            meta["resourceVersion"] = str(next(self._versions))
        return request

    async def _drop(self, resource: kmock.resource, namespace: str, name: str) -> str | None:
        async with self._lock:
            key = (resource, namespace, name)
            if key not in self.objects or self.objects[key].deleted:
                return None
            raw = self.objects[key].raw
            self.objects[key].delete()
            await self._buses[resource].put({"type": "DELETED", "object": raw})
            return str(raw.get("metadata", {}).get("uid") or "") or None

    async def _collect_garbage(self, uids: set[Any]) -> None:
        while uids:
            dependents = [
                (res, ns, name)
                for (res, ns, name), obj in list(self.objects.items())
                if not obj.deleted
                and any(ref.get("uid") in uids for ref in obj.get("metadata", {}).get("ownerReferences") or [])
            ]
            uids = set()
            for res, ns, name in dependents:
                uid = await self._drop(res, ns, name)
                if uid:
                    uids.add(uid)

    # --- emulated controllers ------------------------------------------------------------------------

    def _react(self, resource: kmock.resource, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        reaction = None
        owners = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
        if before is None and owners and not owners & self._live_uids():
            # Created for an owner that is already gone (a reconcile racing the owner's deletion).
            meta = obj["metadata"]
            reaction = self.remove(resource, meta["namespace"], meta["name"])
        elif resource == JOBS and before is None:
            reaction = self._run_job(obj)
        elif resource == DEPLOYMENTS and (before is None or before.get("spec") != obj.get("spec")):
            reaction = self._roll_deployment(obj)
        elif resource == PVCS and before is None and self.bind_pvcs:
            meta = obj["metadata"]
            reaction = self.put(PVCS, meta["namespace"], meta["name"], {"status": {"phase": "Bound"}})
        if reaction is not None:
            task = asyncio.get_running_loop().create_task(reaction)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _live_uids(self) -> set[Any]:
        return {obj.get("metadata", {}).get("uid") for obj in self.objects.values() if not obj.deleted}

    async def _run_job(self, job: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        template = job["spec"]["template"]
        labels = {**(template.get("metadata", {}).get("labels") or {}), "job-name": name,
                  "batch.kubernetes.io/job-name": name}  # fmt: skip
        container = template["spec"]["containers"][0]
        await self.put(JOBS, ns, name, {"status": {"active": 1, "startTime": _now()}})
        await self.put(PODS, ns, f"{name}-pod", {
            "metadata": {"labels": labels, "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": meta["uid"], "controller": True}]},
            "spec": template["spec"],
            "status": {"phase": "Running", "containerStatuses": [
                {"name": container["name"], "image": container["image"], "ready": True, "restartCount": 0,
                 "state": {"running": {"startedAt": _now()}}}]},
        })  # fmt: skip
        revision = _arg(container.get("args") or [], "--revision")
        outcome = self.outcomes.get(revision, CacheOutcome())
        if outcome is not None:
            await asyncio.sleep(0.05)
            await self._finish_job(job, outcome)

    async def _finish_job(self, job: dict[str, Any], outcome: CacheOutcome) -> None:
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        args = container.get("args") or []
        message = json.dumps(outcome.summary(_arg(args, "--model"), _arg(args, "--revision")))
        terminated = {"exitCode": 0 if outcome.ok else 3, "reason": "Completed" if outcome.ok else "Error",
                      "message": message, "finishedAt": _now()}  # fmt: skip
        pod_status = {"status": {
            "phase": "Succeeded" if outcome.ok else "Failed",
            "containerStatuses": [{"name": container["name"], "image": container["image"], "ready": False,
                                   "restartCount": 0, "state": {"terminated": terminated}}],
        }}  # fmt: skip
        condition = {"type": "Complete" if outcome.ok else "Failed", "status": "True", "lastTransitionTime": _now(),
                     "reason": None if outcome.ok else "PodFailurePolicy"}  # fmt: skip
        status = {"active": None, "completionTime": _now() if outcome.ok else None,
                  "succeeded": 1 if outcome.ok else None, "failed": None if outcome.ok else 1,
                  "conditions": [{k: v for k, v in condition.items() if v is not None}]}  # fmt: skip
        if outcome.pod_report is None:
            await self.put(PODS, ns, f"{name}-pod", pod_status)
            await self.put(JOBS, ns, name, {"status": status})
        else:
            await self.put(JOBS, ns, name, {"status": status})
            await outcome.pod_report.wait()
            await self.put(PODS, ns, f"{name}-pod", pod_status)

    async def _roll_deployment(self, deployment: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        meta = deployment["metadata"]
        replicas = int(deployment["spec"].get("replicas", 1))
        ready = replicas if self.deployments_ready else 0
        status = {"observedGeneration": meta.get("generation", 1), "replicas": replicas, "updatedReplicas": replicas,
                  "readyReplicas": ready, "availableReplicas": ready}  # fmt: skip
        await self.put(DEPLOYMENTS, meta["namespace"], meta["name"], {"status": status})


def _name_of(data: Any) -> str | None:
    return (data or {}).get("metadata", {}).get("name") if isinstance(data, dict) else None
