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
  (``deployments_ready = False`` keeps them unready). No ReplicaSets are emulated; with
  ``server_pods = True`` each rollout also replaces the Deployment's pods (named
  ``<deployment>-g<generation>-<i>``, the template's labels, Ready, ``podIP`` 127.0.0.1), so a test can
  serve their runtime's ``/status`` and see whether a change replaced them.
- **A PVC binder**: new PVCs become ``Bound`` (``bind_pvcs = False`` leaves them ``Pending``).
- **A StatefulSet controller** (``cache.sharing: PerReplica``): claims ``<template>-<set>-<ordinal>`` from
  ``volumeClaimTemplates`` (an existing claim of that name is used as is), pods ``<set>-<ordinal>`` labelled
  ``controller-revision-hash``, the ``RollingUpdate`` partition (ordinals at or above it get the newest
  template, replaced highest first, one at a time), ``Parallel`` scaling, and status (replicas, readyReplicas,
  updatedReplicas, currentRevision/updateRevision, observedGeneration). Each new pod's init container
  ``cache`` terminates with a summary as ``vllm-runtime cache`` writes it: ``downloadedBytes`` 0 when its claim
  already held the commit (a warm claim), else the model's bytes. ``unschedulable = "<scheduler message>"``
  leaves new model pods (also a Deployment's surge pod) Pending with PodScheduled False/Unschedulable, the
  condition dated ``unschedulable_for`` seconds back (standing in for the time a test would otherwise wait).
- **Optional APIs and CRD-driven discovery**: KEDA's ScaledObject and the InferencePool are declared
  (``optional_apis = False`` leaves them out); ``uninstall``/``install`` take an API out of discovery
  or put it back with a CustomResourceDefinition object (whose watch event makes kopf re-scan, as a
  real CRD's does). A request for a resource that discovery does not list is answered 404, as an API
  server answers for a CRD that is not installed (kmock alone would store the object). No KEDA or
  HPA controller runs: tests write ``spec.replicas`` through ``/scale`` as the autoscaler would.
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

import aiohttp.web
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
CONFIGMAPS = kmock.resource("", "v1", "configmaps")  # spec.adapters: the adapters file
STATEFULSETS = kmock.resource("apps", "v1", "statefulsets")
PDBS = kmock.resource("policy", "v1", "poddisruptionbudgets")
NETWORKPOLICIES = kmock.resource("networking.k8s.io", "v1", "networkpolicies")
SCALEDOBJECTS = kmock.resource("keda.sh", "v1alpha1", "scaledobjects")
HPAS = kmock.resource("autoscaling", "v2", "horizontalpodautoscalers")
INFERENCEPOOLS = kmock.resource("inference.networking.k8s.io", "v1", "inferencepools")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_OPTIONAL = {SCALEDOBJECTS: ("ScaledObject", "scaledobject"), HPAS: ("HorizontalPodAutoscaler", "horizontalpodautoscaler"),
             INFERENCEPOOLS: ("InferencePool", "inferencepool")}  # fmt: skip


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
    adapter: dict[str, Any] | None = None  # a LoRA adapter repo's facts (rank, targetModules) the summary reports
    # Set: the Job's outcome is reported first and its pod's termination message only once this is set
    # (the Job and Pod watches are separate streams; a real cluster can deliver them in either order).
    pod_report: asyncio.Event | None = field(default=None, compare=False)

    def summary(self, model: str, revision: str) -> dict[str, Any]:
        base = {"command": "cache", "model": model, "revision": revision}
        if self.ok:
            extra = {} if self.plan is None else {"plan": self.plan}
            if self.adapter is not None:
                extra["adapter"] = self.adapter
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
    unschedulable: str | None = None  # the scheduler's message for new model pods; None: they schedule
    unschedulable_for: float = 45.0
    filled: dict[tuple[str, str], set[str]] = attrs.field(factory=dict)  # (ns, claim) -> commits on it
    _sts_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _sts_templates: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)  # revision -> template
    server_pods: bool = False
    optional_apis: bool = True

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
        for resource in (SCALEDOBJECTS, INFERENCEPOOLS):
            if self.optional_apis:
                self._declare(resource)

    def _declare(self, resource: kmock.resource) -> None:
        kind, singular = _OPTIONAL[resource]
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind, singular=singular, namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"}, subresources={"status"},
        )  # fmt: skip

    def uninstall(self, resource: kmock.resource) -> None:
        """Take ``resource`` out of discovery: its requests are answered 404 from now on."""
        self.resources.pop(resource, None)

    async def install(self, resource: kmock.resource) -> None:
        """Put ``resource`` (back) into discovery and announce its CRD, as ``kubectl apply -f crds.yaml`` would."""
        self._declare(resource)
        kind, singular = _OPTIONAL[resource]
        await self.put(CRDS, None, f"{resource.plural}.{resource.group}", {  # type: ignore[arg-type]
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "spec": {"group": resource.group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": resource.plural, "singular": singular},
                     "versions": [{"name": resource.version, "served": True, "storage": True}]},
            "status": {"conditions": [{"type": "Established", "status": "True"}]},
        })  # fmt: skip

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

    async def put(self, resource: kmock.resource, namespace: str, name: str, patch: dict[str, Any],
                  *, create: bool = True) -> None:  # fmt: skip
        """Merge ``patch`` into an object (creating it if missing, unless ``create`` is False) and tell the watchers.

        The emulated controllers write status with ``create=False``: their write can come after the object was
        deleted (a model deleted within a Job's first 50 ms), and a real API server answers that with 404
        instead of re-creating an ownerless object that nothing would ever collect."""
        async with self._lock:
            key = (resource, namespace, name)
            if not create and (key not in self.objects or self.objects[key].deleted):
                return
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

    def watched(self, resource: kmock.resource) -> bool:
        """Whether a watch stream on ``resource`` is live (subscribed to its events, not only requested)."""
        return resource in self._buses and self._buses[resource].consumer_count > 0

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
        if request.resource.plural and request.resource not in self.resources:  # a CRD that is not installed
            status = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound",
                      "message": "the server could not find the requested resource"}  # fmt: skip
            return aiohttp.web.json_response(status, status=404)
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
            dependents = self._dependents_of(uids)
            uids = set()
            for res, ns, name in dependents:
                uid = await self._drop(res, ns, name)
                if uid:
                    uids.add(uid)

    # --- emulated controllers ------------------------------------------------------------------------

    def _react(self, resource: kmock.resource, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        reaction = None
        owners = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
        if before is None and owners and not self._any_alive(owners):
            # Created for an owner that is already gone (a reconcile racing the owner's deletion).
            meta = obj["metadata"]
            reaction = self.remove(resource, meta["namespace"], meta["name"])
        elif resource == JOBS and before is None:
            reaction = self._run_job(obj)
        elif resource == DEPLOYMENTS and (before is None or before.get("spec") != obj.get("spec")):
            reaction = self._roll_deployment(obj)
        elif resource == STATEFULSETS and (before is None or before.get("spec") != obj.get("spec")):
            reaction = self._roll_statefulset(obj)
        elif resource == PVCS and before is None and self.bind_pvcs:
            meta = obj["metadata"]
            reaction = self.put(PVCS, meta["namespace"], meta["name"], {"status": {"phase": "Bound"}}, create=False)
        if reaction is not None:
            task = asyncio.get_running_loop().create_task(reaction)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _dependents_of(self, uids: set[Any]) -> list[tuple[Any, Any, Any]]:
        """The live objects with an ownerReference to one of ``uids``."""
        return [
            (res, ns, name)
            for (res, ns, name), obj in list(self.objects.items())
            if not obj.deleted
            and any(ref.get("uid") in uids for ref in obj.get("metadata", {}).get("ownerReferences") or [])
        ]

    def _any_alive(self, uids: set[Any]) -> bool:
        """Whether a live object has one of ``uids``."""
        return any(obj.get("metadata", {}).get("uid") in uids for obj in self.objects.values() if not obj.deleted)

    async def _run_job(self, job: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        template = job["spec"]["template"]
        labels = {**(template.get("metadata", {}).get("labels") or {}), "job-name": name,
                  "batch.kubernetes.io/job-name": name}  # fmt: skip
        container = template["spec"]["containers"][0]
        await self.put(JOBS, ns, name, {"status": {"active": 1, "startTime": _now()}}, create=False)
        if self.read(JOBS, ns, name) is None:  # deleted meanwhile: the Job controller starts no pod
            return
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
        if outcome.ok:  # the commit is on the claim now (a replica's init container finds it warm)
            for volume in job["spec"]["template"]["spec"].get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if volume.get("name") == "cache" and claim:
                    revision = _arg(args, "--revision")
                    pinned = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
                    self.filled.setdefault((ns, claim), set()).add(
                        revision if pinned else outcome.summary(_arg(args, "--model"), revision)["commit"])
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
            await self.put(PODS, ns, f"{name}-pod", pod_status, create=False)
            await self.put(JOBS, ns, name, {"status": status}, create=False)
        else:
            await self.put(JOBS, ns, name, {"status": status}, create=False)
            await outcome.pod_report.wait()
            await self.put(PODS, ns, f"{name}-pod", pod_status, create=False)

    async def _roll_deployment(self, deployment: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        meta = deployment["metadata"]
        replicas = int(deployment["spec"].get("replicas", 1))
        ready = replicas if self.deployments_ready else 0
        status = {"observedGeneration": meta.get("generation", 1), "replicas": replicas, "updatedReplicas": replicas,
                  "readyReplicas": ready, "availableReplicas": ready}  # fmt: skip
        if self.server_pods:
            await self._replace_server_pods(deployment, ready > 0)
        if self.unschedulable is not None and int(meta.get("generation", 1)) > 1:
            # The surge pod of the new template cannot be scheduled: the old pods keep serving.
            template = deployment["spec"]["template"]
            await self.put(PODS, meta["namespace"], f"{meta['name']}-g{meta.get('generation')}-surge",
                           self._pending_pod(template))  # fmt: skip
            status = {"observedGeneration": meta.get("generation", 1), "replicas": replicas + 1, "updatedReplicas": 0}
        await self.put(DEPLOYMENTS, meta["namespace"], meta["name"], {"status": status}, create=False)

    def _pending_pod(self, template: dict[str, Any]) -> dict[str, Any]:
        since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=self.unschedulable_for)
        return {
            "metadata": {"labels": dict(template["metadata"].get("labels") or {})},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": self.unschedulable,
                "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%SZ")}]},
        }  # fmt: skip

    # --- the StatefulSet controller ------------------------------------------------------------------

    async def _roll_statefulset(self, sts: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        async with self._sts_lock:  # one step at a time, as the controller's work queue does per object
            current = self.read(STATEFULSETS, sts["metadata"]["namespace"], sts["metadata"]["name"])
            if current is not None:
                await self._sync_statefulset(current)

    async def _sync_statefulset(self, sts: dict[str, Any]) -> None:
        meta, spec = sts["metadata"], sts["spec"]
        ns, name = meta["namespace"], meta["name"]
        replicas = int(spec.get("replicas", 1))
        partition = int(((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition") or 0)
        template = spec["template"]
        revision = f"{name}-{hashlib.sha1(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]}"
        self._sts_templates[revision] = template
        old = (sts.get("status") or {}).get("currentRevision") or revision
        for ordinal in range(replicas):
            for claim_template in spec.get("volumeClaimTemplates") or []:
                claim = f"{claim_template['metadata']['name']}-{name}-{ordinal}"
                if self.read(PVCS, ns, claim) is None:
                    labels = {**(claim_template["metadata"].get("labels") or {}), **spec["selector"]["matchLabels"]}
                    await self.put(PVCS, ns, claim, {
                        "metadata": {"labels": labels, "annotations": claim_template["metadata"].get("annotations")},
                        "spec": claim_template["spec"], "status": {"phase": "Bound"}})  # fmt: skip
        for pod_name in self.names(PODS, ns):
            number = _ordinal(name, pod_name)
            if number is not None and number >= replicas:
                await self.remove(PODS, ns, pod_name)
        for ordinal in reversed(range(replicas)):  # highest ordinal first, one at a time
            wanted = revision if ordinal >= partition else old
            pod = self.read(PODS, ns, f"{name}-{ordinal}")
            if pod is not None and (pod["metadata"].get("labels") or {}).get("controller-revision-hash") == wanted:
                continue
            if pod is not None:
                await self.remove(PODS, ns, f"{name}-{ordinal}")
                await asyncio.sleep(0.02)
            await self._start_replica(sts, ordinal, wanted, self._sts_templates.get(wanted, template))
        pods = [self.read(PODS, ns, f"{name}-{i}") for i in range(replicas)]
        hashes = [((p or {}).get("metadata", {}).get("labels") or {}).get("controller-revision-hash") for p in pods]
        ready = sum(1 for p in pods if p and any(c.get("type") == "Ready" and c.get("status") == "True"
                                                  for c in p["status"].get("conditions") or []))  # fmt: skip
        updated = sum(1 for h in hashes if h == revision)
        status = {"observedGeneration": meta.get("generation", 1), "replicas": sum(1 for p in pods if p),
                  "readyReplicas": ready, "availableReplicas": ready, "updatedReplicas": updated,
                  "currentReplicas": sum(1 for h in hashes if h == (revision if updated == replicas else old)),
                  "updateRevision": revision, "currentRevision": revision if updated == replicas else old}  # fmt: skip
        await self.put(STATEFULSETS, ns, name, {"status": status}, create=False)

    async def _start_replica(self, sts: dict[str, Any], ordinal: int, revision: str, template: dict[str, Any]) -> None:
        meta = sts["metadata"]
        ns, name = meta["namespace"], meta["name"]
        labels = {**(template["metadata"].get("labels") or {}), "controller-revision-hash": revision,
                  "statefulset.kubernetes.io/pod-name": f"{name}-{ordinal}"}  # fmt: skip
        owner = [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": meta["uid"], "controller": True}]
        if self.unschedulable is not None:
            pod = self._pending_pod(template)
            pod["metadata"] = {"labels": labels, "ownerReferences": owner}
            await self.put(PODS, ns, f"{name}-{ordinal}", pod)
            return
        init = template["spec"]["initContainers"][0]
        args = init.get("args") or []
        model, commit = _arg(args, "--model"), _arg(args, "--revision")
        claim = f"{sts['spec']['volumeClaimTemplates'][0]['metadata']['name']}-{name}-{ordinal}"
        warm = commit in self.filled.setdefault((ns, claim), set())
        self.filled[(ns, claim)].add(commit)
        if "--adapters-file" in args:  # spec.adapters: the published adapters are cached into the claim too
            published = self.read(CONFIGMAPS, ns, f"{name}-adapters") or {}
            text = (published.get("data") or {}).get("adapters.json") or "{}"
            self.filled[(ns, claim)] |= {e["commit"] for e in json.loads(text).get("adapters", []) if e.get("commit")}
        summary = {**CacheOutcome(commit=commit).summary(model, commit),
                   "downloadedBytes": 0 if warm else CacheOutcome().bytes}  # fmt: skip
        await self.put(PODS, ns, f"{name}-{ordinal}", {
            "metadata": {"labels": labels, "ownerReferences": owner,
                         "annotations": dict(template["metadata"].get("annotations") or {})},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                       "initContainerStatuses": [{"name": init["name"], "ready": True, "restartCount": 0, "state": {
                           "terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(summary)}}}],
                       "containerStatuses": [{"name": "vllm", "ready": True, "restartCount": 0,
                                              "state": {"running": {"startedAt": _now()}}}]},
        })  # fmt: skip

    async def _replace_server_pods(self, deployment: dict[str, Any], ready: bool) -> None:
        meta = deployment["metadata"]
        ns, name, generation = meta["namespace"], meta["name"], meta.get("generation", 1)
        template = deployment["spec"]["template"]
        wanted = {f"{name}-g{generation}-{i}" for i in range(int(deployment["spec"].get("replicas", 1)))}
        for pod in self.names(PODS, ns):
            body = self.read(PODS, ns, pod) or {}
            owner = (body["metadata"].get("annotations") or {}).get("emulator/deployment")
            if owner == name and pod not in wanted:
                await self.remove(PODS, ns, pod)
        for pod in sorted(wanted - set(self.names(PODS, ns))):
            await self.put(PODS, ns, pod, {
                "metadata": {"labels": dict(template["metadata"].get("labels") or {}),
                             "annotations": {"emulator/deployment": name}},
                "status": {"phase": "Running", "podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                           "containerStatuses": [{"name": "vllm", "ready": ready, "restartCount": 0,
                                                  "state": {"running": {"startedAt": _now()}}}]},
            })  # fmt: skip


def _ordinal(statefulset: str, pod: str) -> int | None:
    rest = pod.removeprefix(statefulset + "-")
    return int(rest) if rest != pod and rest.isdigit() else None


def _name_of(data: Any) -> str | None:
    return (data or {}).get("metadata", {}).get("name") if isinstance(data, dict) else None
