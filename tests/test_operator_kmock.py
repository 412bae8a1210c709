"""The real operator (kopf + our handlers) against the kmock API emulator over HTTP.

One operator runs for the whole module (stopping kopf takes seconds); each test works in its own
namespace. What the emulator stands in for (garbage collector, Job and Deployment controllers,
server-side apply, ...) is listed in ``kube_emulator``'s docstring. What it cannot show: real
server-side apply field ownership, admission and CRD schema validation (tested in the CRD tests),
pods actually running vLLM (the e2e tests), and the timing of a real rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
from kube_emulator import (
    DEPLOYMENTS,
    EVENTS,
    HOLD,
    JOBS,
    PODS,
    PVCS,
    SERVICES,
    VLLMMODELS,
    CacheOutcome,
    Fault,
    KubeEmulator,
    commit_for,
)

from hub_fixtures import TINY_REPO

from vllm_operator import builders, runner
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_runtime.devhub.server import DevHub

pytestmark = [pytest.mark.kmock, pytest.mark.asyncio(loop_scope="module")]

REPO = "org/tiny"
TIMEOUT = 20.0


class Operator:
    """The operator in a thread with its own event loop; restartable.

    kopf cancels every task of its loop that appeared after it started when it stops, so it must
    not share a loop with the emulator's HTTP server (whose connection tasks it would cancel).
    """

    def __init__(self, config: Config, url: str, namespaces: tuple[str, ...] = ()) -> None:
        self.config = config
        self.url = url
        self.namespaces = namespaces
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()

    async def login(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.url, insecure=True)

    async def start(self) -> None:
        self.stop_flag = threading.Event()
        ready = threading.Event()

        def run() -> None:
            coro = runner.operator_task(self.config, self.namespaces, login=self.login, stop_flag=self.stop_flag,
                                        ready_flag=ready)  # fmt: skip
            asyncio.run(coro)

        self.thread = threading.Thread(target=run, name="operator", daemon=True)
        self.thread.start()
        assert await asyncio.to_thread(ready.wait, TIMEOUT), "the operator did not start"

    async def stop(self) -> None:
        assert self.thread is not None
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "the operator did not stop"
        self.thread = None


class Cluster:
    def __init__(self, emu: KubeEmulator, operator: Operator) -> None:
        self.emu = emu
        self.operator = operator

    async def create(self, namespace: str, name: str, **spec: Any) -> None:
        body = {"apiVersion": "vllm-operator.io/v1alpha1", "kind": "VLLMModel",
                "metadata": {"name": name, "namespace": namespace}, "spec": {"model": REPO, **spec}}  # fmt: skip
        await self._send("POST", f"/apis/vllm-operator.io/v1alpha1/namespaces/{namespace}/vllmmodels", body)

    async def patch(self, namespace: str, name: str, patch: dict[str, Any], subresource: str = "") -> None:
        path = f"/apis/vllm-operator.io/v1alpha1/namespaces/{namespace}/vllmmodels/{name}"
        await self._send("PATCH", path + (f"/{subresource}" if subresource else ""), patch)

    async def delete(self, namespace: str, name: str) -> None:
        await self._send("DELETE", f"/apis/vllm-operator.io/v1alpha1/namespaces/{namespace}/vllmmodels/{name}", None)

    async def _send(self, method: str, path: str, body: Any) -> None:
        headers = {"Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"}
        data = None if body is None else json.dumps(body)
        async with self.emu.request(method, path, data=data, headers=headers) as resp:
            assert resp.status < 400, await resp.text()

    def model(self, namespace: str, name: str) -> dict[str, Any]:
        body = self.emu.read(VLLMMODELS, namespace, name)
        assert body is not None
        return body

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.model(namespace, name).get("status") or {})

    def deployment_commit(self, namespace: str, name: str) -> str | None:
        dep = self.emu.read(DEPLOYMENTS, namespace, name)
        return None if dep is None else dep["metadata"]["annotations"][builders.ANNOTATION_COMMIT]

    def event_reasons(self, namespace: str) -> set[str]:
        return {str(self.emu.read(EVENTS, namespace, n)["reason"]) for n in self.emu.names(EVENTS, namespace)}  # type: ignore[index]

    async def ready(self, namespace: str, name: str) -> dict[str, Any]:
        await eventually(lambda: self.status(namespace, name).get("phase") == "Ready", f"{namespace}/{name} Ready")
        return self.status(namespace, name)


async def eventually(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if check():
                return
        except (AssertionError, KeyError, TypeError):
            pass
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def operator_on(emu: KubeEmulator, config: Config, namespaces: tuple[str, ...] = ()) -> AsyncIterator[Cluster]:
    """The real operator against ``emu`` (served over HTTP), for a test module's fixture; ``namespaces``:
    the namespaces it watches (all when empty)."""
    async with kmock.Server(emu) as server:
        operator = Operator(config, str(server.url).rstrip("/"), namespaces=namespaces)
        await operator.start()
        try:
            yield Cluster(emu, operator)
        finally:
            if operator.thread is not None:
                await operator.stop()


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tiny_model_dir: Path) -> AsyncIterator[Cluster]:
    # A loopback Hub serving TINY_REPO, so the operator's memory planner reads a real config and headers.
    with DevHub() as hub:
        hub.add_repo(TINY_REPO, tiny_model_dir)
        # A long resync: convergence in these tests must come from watches and retries, not the timer.
        # Refusals surface after 2 s and retries back off to at most 2 s, so the tests stay short.
        config = Config(reconcile_interval_seconds=600, metrics_port=free_port(), hf_endpoint=hub.url,
                        surface_failures_after_seconds=2, retry_max_delay_seconds=2)  # fmt: skip
        async with KubeEmulator() as emu, operator_on(emu, config) as running:
            yield running


@pytest.fixture(autouse=True)
def fresh_request_log(cluster: Cluster) -> None:
    cluster.emu.forget_requests()


def job_name(namespace: str, name: str, revision: str = "main", **spec: Any) -> str:
    body = {"metadata": {"name": name, "namespace": namespace},
            "spec": {"model": REPO, "revision": revision, **spec}}  # fmt: skip
    return builders.cache_job_name(VLLMModel.from_body(body))


# --- the tests ---------------------------------------------------------------------------------------


async def test_create_brings_up_every_child_and_ready_status(cluster: Cluster) -> None:
    ns = "create"
    await cluster.create(ns, "m")
    status = await cluster.ready(ns, "m")
    commit = commit_for(REPO, "main")
    emu = cluster.emu
    model_uid = cluster.model(ns, "m")["metadata"]["uid"]
    assert emu.names(PVCS, ns) == ["m-cache"]
    assert emu.names(JOBS, ns) == [job_name(ns, "m")]
    assert emu.names(DEPLOYMENTS, ns) == ["m"] and emu.names(SERVICES, ns) == ["m"]
    for resource, name in [(JOBS, job_name(ns, "m")), (DEPLOYMENTS, "m"), (SERVICES, "m")]:
        obj = emu.read(resource, ns, name)
        assert obj is not None and obj["metadata"]["ownerReferences"][0]["uid"] == model_uid
    pvc = emu.read(PVCS, ns, "m-cache")
    assert pvc is not None and "ownerReferences" not in pvc["metadata"], "Retain: no owner, the cache stays"
    dep = emu.read(DEPLOYMENTS, ns, "m")
    assert dep is not None and commit in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert status["resolvedRevision"] == commit
    assert status["observedGeneration"] == 1
    assert status["cache"]["commit"] == commit and status["cache"]["bytes"] == 5 * 2**20
    assert status["cache"]["verified"] is True
    assert status["readyReplicas"] == 1 and status["replicas"] == 1
    assert status["endpoint"] == "http://m.create.svc:8000/v1"
    assert status["selector"] == "app.kubernetes.io/name=vllm-model,app.kubernetes.io/instance=m,app.kubernetes.io/component=server"
    for type_ in ("Cached", "Ready"):
        assert condition(status, type_)["status"] == "True"
    assert condition(status, "Failed")["status"] == "False"
    assert condition(status, "MemoryFits")["status"] == "Unknown"
    await eventually(lambda: {"CacheStarted", "CacheFinished", "Deployed", "Ready"} <= cluster.event_reasons(ns),
                     "the step events")  # fmt: skip
    assert not cluster.model(ns, "m")["metadata"].get("finalizers"), "owner references do the cleanup"


async def test_operator_metrics_are_served(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{cluster.operator.config.metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert 'vllm_operator_reconcile_total{result="success"}' in text
    assert "vllm_operator_reconcile_duration_seconds_bucket" in text
    assert 'vllm_operator_models{phase="Ready"}' in text
    assert "vllm_operator_reconcile_errors_total" in text


async def test_revision_change_caches_first_then_rolls(cluster: Cluster) -> None:
    ns, emu = "update", cluster.emu
    emu.outcomes["v2"] = HOLD
    await cluster.create(ns, "m")
    await cluster.ready(ns, "m")
    old, new = commit_for(REPO, "main"), commit_for(REPO, "v2")
    await cluster.patch(ns, "m", {"spec": {"revision": "v2"}})
    new_job = job_name(ns, "m", "v2")
    await eventually(lambda: emu.read(JOBS, ns, new_job) is not None, "the new cache Job")
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Caching", "phase Caching")
    # While the new commit is being cached the old Deployment serves, untouched.
    status = cluster.status(ns, "m")
    assert cluster.deployment_commit(ns, "m") == old
    assert status["resolvedRevision"] == old and status["observedGeneration"] == 2
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Cached")["status"] == "False"
    dep = emu.read(DEPLOYMENTS, ns, "m")
    assert dep is not None and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    await emu.finish_job(ns, new_job, CacheOutcome())
    await eventually(lambda: cluster.deployment_commit(ns, "m") == new, "the Deployment rolled to the new commit")
    status = await cluster.ready(ns, "m")
    assert status["resolvedRevision"] == new and status["cache"]["revision"] == "v2"


async def test_scale_through_the_scale_subresource(cluster: Cluster) -> None:
    ns, emu = "scale", cluster.emu
    # A shared cache: the Deployment scales (ReadWriteOnce would move to a StatefulSet: test_replicas_kmock.py).
    await cluster.create(ns, "m", cache={"accessModes": ["ReadWriteMany"]})
    await cluster.ready(ns, "m")
    await cluster.patch(ns, "m", {"spec": {"replicas": 3}}, subresource="scale")
    await eventually(lambda: emu.read(DEPLOYMENTS, ns, "m")["spec"]["replicas"] == 3, "Deployment scaled")  # type: ignore[index]
    await eventually(lambda: cluster.status(ns, "m").get("readyReplicas") == 3, "status.readyReplicas 3")
    assert cluster.status(ns, "m")["replicas"] == 3
    assert cluster.deployment_commit(ns, "m") == commit_for(REPO, "main"), "scaling does not re-cache"
    assert emu.names(JOBS, ns) == [job_name(ns, "m")]


async def test_delete_removes_children_and_keeps_a_retained_cache(cluster: Cluster) -> None:
    ns, emu = "delete", cluster.emu
    await cluster.create(ns, "keep")
    await cluster.create(ns, "drop", cache={"deletePolicy": "Delete"})
    await cluster.ready(ns, "keep")
    await cluster.ready(ns, "drop")
    await cluster.delete(ns, "keep")
    await cluster.delete(ns, "drop")
    await eventually(lambda: not emu.names(DEPLOYMENTS, ns) and not emu.names(JOBS, ns), "children collected")
    assert emu.names(VLLMMODELS, ns) == [], "no finalizer holds the models"
    assert emu.names(SERVICES, ns) == [] and emu.names(PODS, ns) == []
    assert emu.names(PVCS, ns) == ["keep-cache"], "Retain keeps the cache; Delete removes it"


async def test_failing_cache_job_reports_why_and_recovers_once_fixed(cluster: Cluster) -> None:
    ns, emu = "failing", cluster.emu
    emu.outcomes["gated"] = CacheOutcome(ok=False, reason="GatedRepo", message="401 on a gated repo")
    await cluster.create(ns, "m", revision="gated")
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Failed", "phase Failed")
    status = cluster.status(ns, "m")
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "GatedRepo"
    assert "spec.hfTokenSecretRef" in failed["message"] and "401 on a gated repo" in failed["message"]
    assert emu.names(DEPLOYMENTS, ns) == [], "nothing is deployed without a cached commit"
    await eventually(lambda: "GatedRepo" in cluster.event_reasons(ns), "a Warning event")
    # The fix: a token. The failed Job no longer matches the spec and is replaced.
    emu.outcomes["gated"] = CacheOutcome()
    await cluster.patch(ns, "m", {"spec": {"hfTokenSecretRef": {"name": "hf-token"}}})
    status = await cluster.ready(ns, "m")
    assert condition(status, "Failed")["status"] == "False"
    job = emu.read(JOBS, ns, job_name(ns, "m", "gated"))
    assert job is not None
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in env


async def test_children_deleted_by_hand_come_back(cluster: Cluster) -> None:
    ns, emu = "byhand", cluster.emu
    await cluster.create(ns, "m")
    await cluster.ready(ns, "m")
    old_uid = emu.read(DEPLOYMENTS, ns, "m")["metadata"]["uid"]  # type: ignore[index]
    await emu.remove(DEPLOYMENTS, ns, "m")
    await emu.remove(SERVICES, ns, "m")
    await eventually(lambda: emu.read(DEPLOYMENTS, ns, "m") is not None, "the Deployment is back")
    await eventually(lambda: emu.read(SERVICES, ns, "m") is not None, "the Service is back")
    assert emu.read(DEPLOYMENTS, ns, "m")["metadata"]["uid"] != old_uid  # type: ignore[index]
    assert cluster.deployment_commit(ns, "m") == commit_for(REPO, "main")
    await cluster.ready(ns, "m")


async def test_api_faults_then_convergence(cluster: Cluster) -> None:
    ns, emu = "faults", cluster.emu
    faults = {
        "apply Service 500": Fault(2, 500),
        "apply Deployment 500": Fault(3, 500),
        "apply Job 409": Fault(1, 409, "Conflict"),
        "status 409": Fault(2, 409, "Conflict"),
    }
    emu[kmock.method.PATCH, SERVICES, kmock.namespace(ns)] << faults["apply Service 500"]
    emu[kmock.method.PATCH, DEPLOYMENTS, kmock.namespace(ns)] << faults["apply Deployment 500"]
    emu[kmock.method.PATCH, JOBS, kmock.namespace(ns)] << faults["apply Job 409"]
    emu[kmock.method.PATCH, VLLMMODELS, kmock.subresource("status"), kmock.namespace(ns)] << faults["status 409"]
    await cluster.create(ns, "m")
    await cluster.ready(ns, "m")
    assert {name: f.served for name, f in faults.items() if f.left} == {}, "every fault was hit"
    assert cluster.deployment_commit(ns, "m") == commit_for(REPO, "main")
    # The model and its children come from the watches: no reconcile read any of them.
    reads = [str(r.url.path) for r in emu._requests
             if r.method == kmock.method.GET and r.namespace == ns and "watch" not in r.params]  # fmt: skip
    assert reads == []


async def test_dropped_watch_then_convergence(cluster: Cluster) -> None:
    ns, emu = "watchdrop", cluster.emu
    await cluster.create(ns, "m", cache={"accessModes": ["ReadWriteMany"]})  # a Deployment at 2 replicas
    await cluster.ready(ns, "m")
    # The watch breaks, and the next reconnections fail too, while the spec changes.
    reconnects = Fault(2, 500)
    emu[kmock.action.WATCH, VLLMMODELS] << reconnects
    assert emu.drop_watches(VLLMMODELS) >= 1
    await cluster.patch(ns, "m", {"spec": {"replicas": 2}})
    await eventually(lambda: emu.read(DEPLOYMENTS, ns, "m")["spec"]["replicas"] == 2, "the change after the drop")  # type: ignore[index]
    await eventually(lambda: cluster.status(ns, "m").get("readyReplicas") == 2, "status follows")
    assert reconnects.served == 2


async def test_operator_restarted_mid_reconcile(cluster: Cluster) -> None:
    ns, emu = "restart", cluster.emu
    emu.outcomes["slow"] = HOLD
    await cluster.create(ns, "m", revision="slow")
    job = job_name(ns, "m", "slow")
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Caching", "caching")
    await cluster.operator.stop()
    # While the operator is down: the cache finishes and someone deletes the Service.
    await emu.finish_job(ns, job, CacheOutcome())
    assert emu.read(DEPLOYMENTS, ns, "m") is None
    await cluster.operator.start()
    status = await cluster.ready(ns, "m")
    assert status["resolvedRevision"] == commit_for(REPO, "slow")
    assert emu.names(JOBS, ns) == [job], "the finished Job is reused, not re-run"


async def test_crash_looping_vllm_is_reported_with_the_pods_message(cluster: Cluster) -> None:
    ns, emu = "crashloop", cluster.emu
    emu.deployments_ready = False
    try:
        await cluster.create(ns, "m")
        await eventually(lambda: cluster.status(ns, "m").get("phase") == "Loading", "phase Loading")
    finally:
        emu.deployments_ready = True
    crash = {"ok": False, "command": "serve", "reason": "OutOfMemory", "message": "lower spec.maxModelLen"}
    model = VLLMModel.from_body(cluster.model(ns, "m"))
    container = {"name": "vllm", "image": "img", "restartCount": 5, "ready": False}
    pod = {"metadata": {"labels": builders.labels_for(model, builders.COMPONENT_SERVER)},
           "status": {"phase": "Running", "containerStatuses": [{
               **container, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
               "lastState": {"terminated": {"exitCode": 3, "message": json.dumps(crash)}}}]}}  # fmt: skip
    await emu.put(PODS, ns, "m-7d9f-abcde", pod)
    await eventually(lambda: condition(cluster.status(ns, "m"), "Failed")["reason"] == "CrashLoopBackOff", "Failed")
    status = cluster.status(ns, "m")
    assert status["phase"] == "Failed"
    assert "OutOfMemory: lower spec.maxModelLen" in condition(status, "Failed")["message"]
    await eventually(lambda: "CrashLoopBackOff" in cluster.event_reasons(ns), "a Warning event")
    # The pod recovers (e.g. after the spec was fixed): the failure clears.
    await emu.put(PODS, ns, "m-7d9f-abcde", {"status": {"containerStatuses": [
        {**container, "ready": True, "state": {"running": {}}}]}})  # fmt: skip
    await eventually(lambda: condition(cluster.status(ns, "m"), "Failed")["status"] == "False", "failure cleared")


async def test_image_pull_failure_of_the_cache_pod_is_reported(cluster: Cluster) -> None:
    ns, emu = "imagepull", cluster.emu
    emu.outcomes["pull"] = HOLD
    await cluster.create(ns, "m", revision="pull", image="registry.example/missing:1")
    job = job_name(ns, "m", "pull")
    await eventually(lambda: emu.read(PODS, ns, f"{job}-pod") is not None, "the cache pod")
    await emu.put(PODS, ns, f"{job}-pod", {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "cache", "image": "registry.example/missing:1", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}}}]}})  # fmt: skip
    await eventually(lambda: condition(cluster.status(ns, "m"), "Failed")["reason"] == "ImagePullFailed", "Failed")
    message = condition(cluster.status(ns, "m"), "Failed")["message"]
    assert "registry.example/missing:1" in message and "spec.imagePullSecrets" in message


def event_count(cluster: Cluster, namespace: str, reason: str) -> int:
    events = [cluster.emu.read(EVENTS, namespace, n) for n in cluster.emu.names(EVENTS, namespace)]
    return sum(1 for e in events if e is not None and e.get("reason") == reason)


def container_args(obj: dict[str, Any] | None) -> list[str]:
    assert obj is not None
    return list(obj["spec"]["template"]["spec"]["containers"][0]["args"])


async def test_the_memory_plan_decides_before_anything_is_created(cluster: Cluster) -> None:
    ns, emu = "plan", cluster.emu
    # 1 MiB of GPU memory: the planner (reading the loopback Hub) says no, and nothing is created.
    await cluster.create(ns, "m", model=TINY_REPO, gpu={"memory": "1Mi"})
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Failed", "phase Failed")
    status = cluster.status(ns, "m")
    assert (condition(status, "MemoryFits")["status"], condition(status, "MemoryFits")["reason"]) == (
        "False", "DoesNotFit")  # fmt: skip
    assert condition(status, "Failed")["reason"] == "DoesNotFit" and condition(status, "Stalled")["status"] == "True"
    assert status["plan"]["source"] == "operator" and status["plan"]["fits"] is False
    await eventually(lambda: event_count(cluster, ns, "DoesNotFit") == 1, "one Warning event")
    assert [emu.names(r, ns) for r in (PVCS, JOBS, DEPLOYMENTS, SERVICES)] == [[], [], [], []], "nothing created"
    # A spec that fits: planned again, then cached and deployed.
    await cluster.patch(ns, "m", {"spec": {"gpu": {"type": "L4"}, "maxModelLen": "auto"}})
    status = await cluster.ready(ns, "m")
    assert condition(status, "MemoryFits")["status"] == "True" and status["plan"]["source"] == "operator"
    args = container_args(emu.read(DEPLOYMENTS, ns, "m"))
    assert args[args.index("--max-model-len") + 1] == str(status["plan"]["maxModelLen"]), "auto filled from the plan"
    assert "--plan-gpu" in container_args(emu.read(JOBS, ns, job_name(ns, "m", model=TINY_REPO)))
    # A new spec that cannot fit is not rolled out: the serving Deployment stays as it is.
    served = emu.read(DEPLOYMENTS, ns, "m")
    await cluster.patch(ns, "m", {"spec": {"gpu": {"type": None, "memory": "1Mi"}}})
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Failed", "phase Failed again")
    assert emu.read(DEPLOYMENTS, ns, "m") == served
    assert condition(cluster.status(ns, "m"), "Ready")["status"] == "True", "the old pods keep serving"
    await eventually(lambda: event_count(cluster, ns, "DoesNotFit") == 2, "a Warning for the new spec")


async def test_the_cache_job_plans_when_the_operator_cannot(cluster: Cluster) -> None:
    ns, emu = "jobplan", cluster.emu
    too_big = {"fits": False, "reason": "needs 20 GiB, has 16 GiB", "suggestions": ["set spec.maxModelLen: 2048"]}
    emu.outcomes["gated"] = CacheOutcome(plan=too_big)
    # org/tiny is not on the Hub the operator sees (as a gated model without the token): PlanFailed.
    await cluster.create(ns, "m", revision="gated", gpu={"type": "L4"})
    await eventually(lambda: condition(cluster.status(ns, "m"), "Failed")["reason"] == "DoesNotFit", "DoesNotFit")
    status = cluster.status(ns, "m")
    assert status["plan"]["source"] == "cacheJob" and condition(status, "Cached")["status"] == "True"
    assert "spec.maxModelLen: 2048" in condition(status, "Failed")["message"]
    assert emu.names(DEPLOYMENTS, ns) == [], "no Deployment for a spec that does not fit"
    job = emu.read(JOBS, ns, job_name(ns, "m", "gated"))
    assert "--plan-gpu" in container_args(job)
    # The fix: the Job runs again for the new inputs (its files are cached), and the model deploys.
    emu.outcomes["gated"] = CacheOutcome(plan={"fits": True, "reason": "fits", "maxModelLen": 2048})
    await cluster.patch(ns, "m", {"spec": {"maxModelLen": 2048}})
    status = await cluster.ready(ns, "m")
    assert condition(status, "MemoryFits")["status"] == "True" and status["plan"]["source"] == "cacheJob"
    assert emu.read(JOBS, ns, job_name(ns, "m", "gated"))["metadata"]["uid"] != job["metadata"]["uid"]  # type: ignore[index]


async def test_a_cache_pvc_deleted_by_hand_is_filled_again(cluster: Cluster) -> None:
    ns, emu = "pvcgone", cluster.emu
    await cluster.create(ns, "m")
    await cluster.ready(ns, "m")
    job = job_name(ns, "m")
    old_job_uid = emu.read(JOBS, ns, job)["metadata"]["uid"]  # type: ignore[index]
    old_pvc_uid = emu.read(PVCS, ns, "m-cache")["metadata"]["uid"]  # type: ignore[index]
    await emu.remove(PVCS, ns, "m-cache")
    await eventually(lambda: (emu.read(JOBS, ns, job) or {}).get("metadata", {}).get("uid") not in (None, old_job_uid),
                     "the cache Job runs again")  # fmt: skip
    new_pvc_uid = emu.read(PVCS, ns, "m-cache")["metadata"]["uid"]  # type: ignore[index]
    assert new_pvc_uid != old_pvc_uid
    assert emu.read(JOBS, ns, job)["metadata"]["annotations"]["vllm-operator.io/cache-claim-uid"] == new_pvc_uid  # type: ignore[index]
    await eventually(lambda: "CacheVolumeReplaced" in cluster.event_reasons(ns), "an Event says why")
    await eventually(
        lambda: emu.read(DEPLOYMENTS, ns, "m")["metadata"]["annotations"]["vllm-operator.io/cache-claim-uid"]  # type: ignore[index]
        == new_pvc_uid, "the Deployment follows the new cache")  # fmt: skip
    await cluster.ready(ns, "m")


def metric(cluster: Cluster, name: str) -> float:
    url = f"http://127.0.0.1:{cluster.operator.config.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))  # fmt: skip


async def test_a_job_outcome_is_judged_with_its_pods_report_whatever_arrives_first(cluster: Cluster) -> None:
    ns, emu = "joborder", cluster.emu
    report = asyncio.Event()
    emu.outcomes["gated"] = CacheOutcome(ok=False, reason="GatedRepo", message="401 on a gated repo", pod_report=report)
    await cluster.create(ns, "m", revision="gated")
    job = job_name(ns, "m", "gated")
    await eventually(lambda: (emu.read(JOBS, ns, job) or {}).get("status", {}).get("failed") == 1, "the Job failed")
    # The Job says Failed, its pod has not reported why yet: no reason may be stated that the pod's
    # report would contradict. Reconciles keep happening meanwhile (a child event, a resync).
    await cluster.patch(ns, "m", {"metadata": {"labels": {"touch": "1"}}})
    await emu.put(PODS, ns, f"{job}-pod", {"metadata": {"annotations": {"touch": "1"}}})
    await eventually(lambda: metric(cluster, "vllm_operator_reconcile_total") > 0, "reconciles ran")
    status = cluster.status(ns, "m")
    assert status.get("phase") != "Failed" and condition(status, "Failed")["status"] == "False", status
    assert "PodFailurePolicy" not in cluster.event_reasons(ns)
    report.set()
    await eventually(lambda: condition(cluster.status(ns, "m"), "Failed")["reason"] == "GatedRepo", "the pod's reason")
    await eventually(lambda: "GatedRepo" in cluster.event_reasons(ns), "a Warning event with the real reason")
    assert "PodFailurePolicy" not in cluster.event_reasons(ns)


async def test_a_write_the_server_keeps_refusing_shows_in_status_and_an_event_then_clears(cluster: Cluster) -> None:
    ns, emu = "refused", cluster.emu
    refusal = Fault(10**6, 500)
    emu[kmock.method.PATCH, SERVICES, kmock.namespace(ns)] << refusal
    await cluster.create(ns, "m")
    await eventually(lambda: condition(cluster.status(ns, "m"), "Failed")["reason"] == "ApiUnavailable",
                     "the refusal in status")  # fmt: skip
    status = cluster.status(ns, "m")
    assert status["phase"] == "Failed" and "Service/m" in status["message"] and "injected 500" in status["message"]
    await eventually(lambda: "ApiUnavailable" in cluster.event_reasons(ns), "a Warning event")
    # Every other child was still applied: the refused Service does not hold the Deployment back.
    assert emu.read(DEPLOYMENTS, ns, "m") is not None
    served = refusal.served
    await eventually(lambda: refusal.served >= served + 2, "retries continue")
    refusal.left = 0
    await cluster.ready(ns, "m")
    assert condition(cluster.status(ns, "m"), "Failed")["status"] == "False"


async def test_deleted_models_leave_nothing_in_the_operators_memory(cluster: Cluster) -> None:
    ns = "churn"
    before = await asyncio.to_thread(metric, cluster, "vllm_operator_tracked_models")
    names = [f"m{i}" for i in range(10)]
    for name in names:
        await cluster.create(ns, name)
    for name in names:
        await cluster.ready(ns, name)
    assert await asyncio.to_thread(metric, cluster, "vllm_operator_tracked_models") >= before + len(names)
    for name in names:
        await cluster.delete(ns, name)
    # Their children's DELETED events arrive after the models are gone: none may bring a model's state back.
    await eventually(lambda: cluster.emu.names(JOBS, ns) == [] and cluster.emu.names(DEPLOYMENTS, ns) == [],
                     "the children collected")  # fmt: skip
    await eventually(lambda: metric(cluster, "vllm_operator_tracked_models") == before, "no per-model state left")


async def test_namespaced_mode_reads_nothing_cluster_wide(tiny_model_dir: Path) -> None:
    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        config = Config(reconcile_interval_seconds=600, metrics_port=0)
        operator = Operator(config, str(server.url).rstrip("/"), namespaces=("llm",))
        await operator.start()
        try:
            cluster = Cluster(emu, operator)
            await cluster.create("llm", "m")
            await cluster.ready("llm", "m")
        finally:
            await operator.stop()
        paths = {str(r.url.path) for r in emu._requests}
        assert "/api/v1/namespaces" not in paths, "no namespace observation: the chart's Role does not allow it"
        assert not [p for p in paths if p.endswith("/customresourcedefinitions")], "no CRD observation (discovery is fine)"
        watched = {p for p in paths if "/namespaces/" not in p and p.rsplit("/", 1)[-1] in {
            "vllmmodels", "jobs", "pods", "deployments", "services", "persistentvolumeclaims",
            "scaledobjects", "horizontalpodautoscalers", "inferencepools"}}  # fmt: skip
        assert watched == set(), f"cluster-wide reads of objects: {watched}"
