"""LoRA adapters (spec.adapters) end to end through the real operator, against the kmock API emulator.

The emulator runs the cache Jobs (each reports the commit, bytes and the adapter's rank in its termination
message) and, with ``server_pods``, the Deployment's pods. Each pod's runtime ``/status`` is served by
``FakeRuntimes``: like ``vllm-runtime serve --adapters-file``, it reports loaded every adapter the model's
adapters ConfigMap lists at its commit -- unless the test scripts a failure for it, or silences the pod.
What this cannot show: the real runtime loading into vLLM (tests/test_serve_e2e.py, lora-rt's e2e).
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kmock
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from kube_emulator import CONFIGMAPS, DEPLOYMENTS, HOLD, JOBS, PODS, CacheOutcome, KubeEmulator, commit_for
from test_operator_kmock import REPO, TIMEOUT, Cluster, Operator, condition, eventually, free_port, metric

from vllm_operator import builders, lora, runner
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel

pytestmark = [pytest.mark.kmock, pytest.mark.asyncio(loop_scope="module")]

SQL, CHAT = "org/sql-lora", "org/chat-lora"
RANKS = {"sql-1": 8, "chat-1": 32, "chat-2": 32, "new-1": 16, "big-1": 16, "miss-1": 8}


class FakeRuntimes:
    """Each emulated server pod's ``GET /status`` (the runtime's ``adapters`` section), from the ConfigMap."""

    def __init__(self, emu: KubeEmulator) -> None:
        self.emu = emu
        self.failures: dict[tuple[str, str], tuple[str, str]] = {}  # (namespace, adapter) -> (reason, message)
        self.silent: set[tuple[str, str]] = set()  # (namespace, pod) answering 503
        self.port = free_port()
        self.requests = 0
        self._runner: web.AppRunner | None = None

    def url_for(self, pod: Mapping[str, Any]) -> str:
        meta = pod["metadata"]
        return f"http://127.0.0.1:{self.port}/{meta['namespace']}/{meta['name']}/status"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{ns}/{pod}/status", self._status)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _status(self, request: web.Request) -> web.Response:
        ns, pod = request.match_info["ns"], request.match_info["pod"]
        self.requests += 1
        if (ns, pod) in self.silent:
            return web.Response(status=503, text="not now")
        body = self.emu.read(PODS, ns, pod) or {}
        model = (body.get("metadata", {}).get("labels") or {}).get(builders.LABEL_MODEL, "")
        entries = lora.read_file_entries(self.emu.read(CONFIGMAPS, ns, f"{model}-adapters"))
        # A replica with its own claim (cache.sharing PerReplica) has an adapter only once it is on that claim.
        sts_pod = (body.get("metadata", {}).get("labels") or {}).get("statefulset.kubernetes.io/pod-name")
        on_claim = self.emu.filled.get((ns, f"cache-{sts_pod}"), set()) if sts_pod else None
        items = []
        for entry in entries:
            failure = self.failures.get((ns, entry["name"]))
            if failure is None and on_claim is not None and entry.get("commit") not in on_claim:
                failure = ("AdapterNotCached", f"adapter {entry['name']!r}: {entry['model']}@{entry.get('commit')} has "
                           "no completed, verified cache yet")  # fmt: skip
            item = {"name": entry["name"], "model": entry["model"], "commit": entry.get("commit"),
                    "revision": entry.get("revision"), "state": "Loaded", "loaded": True, "reason": None,
                    "message": None, "retryable": False}  # fmt: skip
            if failure is not None:
                item.update(state="Failed", loaded=False, reason=failure[0], message=failure[1],
                            retryable=failure[0] == "AdapterNotCached")
            items.append(item)
        adapters = {"desired": len(items), "loaded": sum(i["loaded"] for i in items), "items": items,
                    "fileError": None, "maxLoraRank": 32}  # fmt: skip
        return web.json_response({"ready": True, "adapters": adapters})


class AdapterOperator(Operator):
    def __init__(self, config: Config, url: str, runtimes: FakeRuntimes) -> None:
        super().__init__(config, url)
        self.runtimes = runtimes

    async def start(self) -> None:
        self.stop_flag = threading.Event()
        ready = threading.Event()

        def run() -> None:
            asyncio.run(runner.operator_task(self.config, self.namespaces, login=self.login, stop_flag=self.stop_flag,
                                             ready_flag=ready, pod_status_url=self.runtimes.url_for))  # fmt: skip

        self.thread = threading.Thread(target=run, name="operator", daemon=True)
        self.thread.start()
        assert await asyncio.to_thread(ready.wait, TIMEOUT), "the operator did not start"


class AdapterCluster(Cluster):
    runtimes: FakeRuntimes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[AdapterCluster]:
    emu = KubeEmulator(server_pods=True)
    emu.outcomes.update({rev: CacheOutcome(adapter={"rank": rank}) for rev, rank in RANKS.items()})
    emu.outcomes["miss-1"] = CacheOutcome(ok=False, reason="RevisionNotFound", message="no revision 'miss-1'")
    async with emu, kmock.Server(emu) as server:
        runtimes = FakeRuntimes(emu)
        await runtimes.start()
        config = Config(reconcile_interval_seconds=600, metrics_port=free_port(), hf_endpoint="http://127.0.0.1:9",
                        surface_failures_after_seconds=2, retry_max_delay_seconds=2)  # fmt: skip
        operator = AdapterOperator(config, str(server.url).rstrip("/"), runtimes)
        await operator.start()
        try:
            c = AdapterCluster(emu, operator)
            c.runtimes = runtimes
            yield c
        finally:
            await operator.stop()
            await runtimes.stop()


def adapter(name: str, model: str, revision: str) -> dict[str, str]:
    return {"name": name, "model": model, "revision": revision}


def adapter_job(ns: str, name: str, model: str, revision: str, **spec: Any) -> str:
    body = {"metadata": {"name": name, "namespace": ns}, "spec": {"model": REPO, **spec}}
    return lora.adapter_job_name(VLLMModel.from_body(body), lora.Adapter(model, model, revision))


def by_name(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in status.get("adapters") or []}


def published(c: Cluster, ns: str, name: str) -> dict[str, str | None]:
    return {e["name"]: e.get("commit") for e in lora.read_file_entries(c.emu.read(CONFIGMAPS, ns, f"{name}-adapters"))}


def adapters_ready(c: Cluster, ns: str, name: str) -> str:
    return str(condition(c.status(ns, name), "AdaptersReady")["status"])


async def poke_until(c: Cluster, ns: str, name: str, check: Any, what: str, timeout: float = 30) -> None:
    """Touch the model (an annotation: a reconcile, nothing else changes) until ``check`` holds: the pods'
    /status is re-read on reconciles at most every few seconds, and this module's resync timer is long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count = 0
    while True:
        try:
            await eventually(check, what, timeout=1.0)
            return
        except AssertionError:
            if loop.time() > deadline:
                raise
        count += 1
        await c.patch(ns, name, {"metadata": {"annotations": {"test/poke": str(count)}}})


def template(c: Cluster, ns: str, name: str) -> dict[str, Any]:
    dep = c.emu.read(DEPLOYMENTS, ns, name)
    assert dep is not None
    return dict(dep["spec"]["template"])


def server_pods(c: Cluster, ns: str) -> dict[str, str]:
    """Server pod name -> uid."""
    out = {}
    for pod in c.emu.names(PODS, ns):
        body = c.emu.read(PODS, ns, pod) or {}
        if (body["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "server":
            out[pod] = body["metadata"]["uid"]
    return out


async def test_adapters_are_cached_published_mounted_and_reported_loaded(cluster: AdapterCluster) -> None:
    ns, c = "lora-create", cluster
    await c.create(ns, "m", adapters=[adapter("sql", SQL, "sql-1"), adapter("chat", CHAT, "chat-1")])
    await c.ready(ns, "m")
    await eventually(lambda: adapters_ready(c, ns, "m") == "True", "AdaptersReady")
    status = c.status(ns, "m")
    assert condition(status, "AdaptersReady")["reason"] == "Loaded"
    # One cache Job per adapter beside the base model's, each with its own commit.
    assert set(c.emu.names(JOBS, ns)) == {builders.cache_job_name(VLLMModel.from_body(c.model(ns, "m"))),
                                          adapter_job(ns, "m", SQL, "sql-1"), adapter_job(ns, "m", CHAT, "chat-1")}
    adapters = by_name(status)
    for name, repo, rev, rank in (("sql", SQL, "sql-1", 8), ("chat", CHAT, "chat-1", 32)):
        entry = adapters[name]
        assert entry["commit"] == commit_for(repo, rev) and entry["revision"] == rev and entry["model"] == repo
        assert entry["cache"]["bytes"] == 5 * 2**20 and entry["cache"]["verified"] is True
        assert entry["rank"] == rank
        assert entry["state"] == "Loaded" and entry["loadedReplicas"] == 1 and entry["readyReplicas"] == 1
        assert "lastError" not in entry
    # The desired set, with resolved commits, in the ConfigMap the pods mount (labelled, owned).
    cm = c.emu.read(CONFIGMAPS, ns, "m-adapters")
    assert cm is not None and cm["metadata"]["labels"]["vllm-operator.io/model"] == "m"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == c.model(ns, "m")["metadata"]["uid"]
    assert json.loads(cm["data"]["adapters.json"]) == {"adapters": [
        {"name": "sql", "model": SQL, "revision": "sql-1", "commit": commit_for(SQL, "sql-1")},
        {"name": "chat", "model": CHAT, "revision": "chat-1", "commit": commit_for(CHAT, "chat-1")}]}
    spec = template(c, ns, "m")["spec"]
    args = spec["containers"][0]["args"]
    assert args[args.index("--adapters-file") + 1] == lora.ADAPTERS_FILE
    # maxLoraRank from the adapters' ranks (32 holds 8 and 32); the other limits' defaults.
    assert args[args.index("--max-lora-rank") + 1] == "32"
    assert args[args.index("--max-loras") + 1] == "4" and args[args.index("--max-cpu-loras") + 1] == "32"
    assert {"name": "adapters", "configMap": {"name": "m-adapters"}} in spec["volumes"]
    assert {"name": "adapters", "mountPath": lora.ADAPTERS_MOUNT, "readOnly": True} in spec["containers"][0][
        "volumeMounts"]
    # The operator's per-adapter metrics (the alert compares them).
    url = f"http://127.0.0.1:{c.operator.config.metrics_port}/metrics"
    samples: dict[tuple[str, str | None, str | None], float] = {}

    async def scrape() -> None:
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
        samples.update({(s.name, s.labels.get("namespace"), s.labels.get("adapter")): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples})  # fmt: skip

    for _ in range(50):  # the gauges follow the status write
        await scrape()
        if all(samples.get((f"vllm_operator_adapter_replicas_{k}", ns, n)) == 1 for k in ("loaded", "ready")
               for n in ("sql", "chat")):  # fmt: skip
            break
        await asyncio.sleep(0.1)
    for name in ("sql", "chat"):
        assert samples[("vllm_operator_adapter_replicas_loaded", ns, name)] == 1
        assert samples[("vllm_operator_adapter_replicas_ready", ns, name)] == 1
    await eventually(lambda: "AdaptersLoaded" in c.event_reasons(ns), "the AdaptersLoaded event")


async def test_adding_changing_and_removing_adapters_restarts_nothing(cluster: AdapterCluster) -> None:
    ns, c = "lora-change", cluster
    await c.create(ns, "m", adapters=[adapter("sql", SQL, "sql-1"), adapter("chat", CHAT, "chat-1")])
    await c.ready(ns, "m")
    await eventually(lambda: adapters_ready(c, ns, "m") == "True", "AdaptersReady")
    before, pods = template(c, ns, "m"), server_pods(c, ns)
    base_job = builders.cache_job_name(VLLMModel.from_body(c.model(ns, "m")))
    base_uid = (c.emu.read(JOBS, ns, base_job) or {})["metadata"]["uid"]
    assert pods, "the emulator runs the Deployment's pods"
    c.emu.outcomes["chat-2"] = HOLD  # the new revision caches for a while
    try:
        # Add "new", move "chat" to a new revision, remove "sql": all at once.
        await c.patch(ns, "m", {"spec": {"adapters": [adapter("chat", CHAT, "chat-2"), adapter("new", "org/new-lora",
                                                                                               "new-1")]}})
        new_job = adapter_job(ns, "m", CHAT, "chat-2")
        await eventually(lambda: new_job in c.emu.names(JOBS, ns), "the new revision's cache Job")
        await eventually(lambda: set(published(c, ns, "m")) == {"chat", "new"}, "sql unpublished, new published")
        # While chat-2 caches, chat keeps being served at chat-1's commit.
        assert published(c, ns, "m")["chat"] == commit_for(CHAT, "chat-1")
        await eventually(lambda: by_name(c.status(ns, "m"))["chat"].get("servingCommit") == commit_for(CHAT, "chat-1")
                         and by_name(c.status(ns, "m"))["chat"]["state"] == "Caching", "chat caching, served old")
        assert "sql" not in by_name(c.status(ns, "m"))
        await eventually(lambda: adapter_job(ns, "m", SQL, "sql-1") not in c.emu.names(JOBS, ns), "sql's Job deleted")
        await c.emu.finish_job(ns, new_job, CacheOutcome(adapter={"rank": 32}))
    finally:
        c.emu.outcomes["chat-2"] = CacheOutcome(adapter={"rank": 32})
    await eventually(lambda: published(c, ns, "m")["chat"] == commit_for(CHAT, "chat-2"), "chat-2 published")
    await eventually(lambda: adapters_ready(c, ns, "m") == "True" and by_name(c.status(ns, "m"))["chat"].get(
        "commit") == commit_for(CHAT, "chat-2"), "all loaded at the new commits")  # fmt: skip
    assert "servingCommit" not in by_name(c.status(ns, "m"))["chat"]
    assert adapter_job(ns, "m", CHAT, "chat-1") not in c.emu.names(JOBS, ns), "the old revision's Job is gone"
    # Nothing restarted: same pod template, same pods, the base model's Job untouched.
    assert template(c, ns, "m") == before
    assert server_pods(c, ns) == pods
    assert (c.emu.read(JOBS, ns, base_job) or {})["metadata"]["uid"] == base_uid
    assert c.status(ns, "m")["phase"] == "Ready"
    # Removing every adapter (spec.adapters: []) keeps LoRA on: still no restart.
    await c.patch(ns, "m", {"spec": {"adapters": []}})
    await eventually(lambda: published(c, ns, "m") == {} and condition(c.status(ns, "m"), "AdaptersReady")[
        "reason"] == "NoAdapters", "no adapters")  # fmt: skip
    assert adapters_ready(c, ns, "m") == "True" and c.status(ns, "m")["adapters"] == []
    assert template(c, ns, "m") == before and server_pods(c, ns) == pods


async def test_an_adapter_that_cannot_load_fails_alone_naming_the_fix(cluster: AdapterCluster) -> None:
    ns, c = "lora-fail", cluster
    message = ("adapter 'big': rank 64 is above the server's max LoRA rank 32: set maxLoraRank to at least 64 "
               "(vLLM restarts with it) or use an adapter of rank <= 32")  # fmt: skip
    c.runtimes.failures[(ns, "big")] = ("AdapterRankTooHigh", message)
    await c.create(ns, "m", adapters=[adapter("sql", SQL, "sql-1"), adapter("big", "org/big-lora", "big-1")])
    await c.ready(ns, "m")
    await eventually(lambda: condition(c.status(ns, "m"), "AdaptersReady")["reason"] == "AdapterRankTooHigh",
                     "AdaptersReady names the failure")  # fmt: skip
    status = c.status(ns, "m")
    cond = condition(status, "AdaptersReady")
    assert cond["status"] == "False" and "adapter 'big'" in cond["message"] and "maxLoraRank" in cond["message"]
    big, sql = by_name(status)["big"], by_name(status)["sql"]
    assert big["state"] == "Failed" and big["loadedReplicas"] == 0
    assert big["lastError"]["reason"] == "AdapterRankTooHigh" and big["lastError"]["retryable"] is False
    # The base model and the other adapter keep serving; Failed is about the base model only.
    assert status["phase"] == "Ready" and condition(status, "Ready")["status"] == "True"
    assert condition(status, "Failed")["status"] == "False"
    await eventually(lambda: by_name(c.status(ns, "m"))["sql"]["state"] == "Loaded", "sql loaded")
    assert sql["name"] == "sql"
    await eventually(lambda: "AdapterFailed" in c.event_reasons(ns), "a Warning Event for the adapter")
    # Fixed (here: the runtime loads it now), the condition clears.
    del c.runtimes.failures[(ns, "big")]
    await poke_until(c, ns, "m", lambda: adapters_ready(c, ns, "m") == "True", "AdaptersReady once it loads")
    assert "lastError" not in by_name(c.status(ns, "m"))["big"]


async def test_an_adapter_that_cannot_be_cached_is_a_cache_failure_of_that_adapter(cluster: AdapterCluster) -> None:
    ns, c = "lora-cache-fail", cluster
    await c.create(ns, "m", adapters=[adapter("sql", SQL, "sql-1"), adapter("miss", "org/miss-lora", "miss-1")])
    await c.ready(ns, "m")
    await eventually(lambda: condition(c.status(ns, "m"), "AdaptersReady")["reason"] == "RevisionNotFound",
                     "AdaptersReady names the cache failure")  # fmt: skip
    status = c.status(ns, "m")
    miss = by_name(status)["miss"]
    assert miss["state"] == "CacheFailed" and "commit" not in miss and "adapter 'miss'" in miss["lastError"]["message"]
    assert set(published(c, ns, "m")) == {"sql"}, "an adapter never cached is not published"
    assert status["phase"] == "Ready"
    await eventually(lambda: "AdapterCacheFailed" in c.event_reasons(ns), "a Warning Event for the cache failure")


async def test_a_pod_that_does_not_answer_is_unknown_never_loaded(cluster: AdapterCluster) -> None:
    ns, c = "lora-silent", cluster
    await c.create(ns, "m", adapters=[adapter("sql", SQL, "sql-1")])
    await c.ready(ns, "m")
    await eventually(lambda: adapters_ready(c, ns, "m") == "True", "AdaptersReady")
    (pod,) = server_pods(c, ns)
    c.runtimes.silent.add((ns, pod))
    try:
        await poke_until(c, ns, "m", lambda: adapters_ready(c, ns, "m") == "Unknown", "AdaptersReady Unknown")
        sql = by_name(c.status(ns, "m"))["sql"]
        assert sql["loadedReplicas"] == 0 and sql["unknownReplicas"] == 1 and sql["readyReplicas"] == 1
        assert condition(c.status(ns, "m"), "AdaptersReady")["reason"] == "ReplicasNotAnswering"
    finally:
        c.runtimes.silent.discard((ns, pod))
    await poke_until(c, ns, "m", lambda: adapters_ready(c, ns, "m") == "True", "loaded again once it answers")
    assert server_pods(c, ns) == {pod: server_pods(c, ns)[pod]}, "the same pod throughout"


async def test_a_deleted_model_leaves_no_pod_reads_and_no_adapter_series(cluster: AdapterCluster) -> None:
    ns, c = "lora-delete", cluster
    before = await asyncio.to_thread(metric, c, "vllm_operator_tracked_models")
    await c.create(ns, "m", adapters=[adapter("sql", SQL, "sql-1")])
    await c.ready(ns, "m")
    await eventually(lambda: adapters_ready(c, ns, "m") == "True", "AdaptersReady")
    reads = c.runtimes.requests
    assert reads > 0, "the pod's /status was read"
    await c.delete(ns, "m")
    await eventually(lambda: metric(c, "vllm_operator_tracked_models") == before, "no per-model state left")
    url = f"http://127.0.0.1:{c.operator.config.metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert f'namespace="{ns}"' not in text, "the adapter gauges of a deleted model are gone"


async def test_per_replica_caches_get_every_adapter_without_a_restart(cluster: AdapterCluster) -> None:
    """cache.sharing PerReplica: replicas start with the published adapters (their init container caches the
    file); an adapter added while they run reaches replica 1's own claim through a prefetch Job."""
    from vllm_operator import replicas

    ns, c = "lora-per-replica", cluster
    await c.create(ns, "m", replicas=2, cache={"sharing": "PerReplica"}, adapters=[adapter("sql", SQL, "sql-1")])
    await c.ready(ns, "m")
    await eventually(lambda: adapters_ready(c, ns, "m") == "True", "AdaptersReady", timeout=30)
    assert by_name(c.status(ns, "m"))["sql"]["loadedReplicas"] == 2
    pods = server_pods(c, ns)
    assert sorted(pods) == ["m-0", "m-1"]
    await c.patch(ns, "m", {"spec": {"adapters": [adapter("sql", SQL, "sql-1"), adapter("new", "org/new-lora", "new-1")]}})
    body = {"metadata": {"name": "m", "namespace": ns}, "spec": {"model": REPO, "replicas": 2}}
    prefetch = replicas.prefetch_job_name(VLLMModel.from_body(body), 1, commit_for("org/new-lora", "new-1"))
    await eventually(lambda: prefetch in c.emu.names(JOBS, ns), "a prefetch of the new adapter into replica 1's claim",
                     timeout=30)  # fmt: skip
    await poke_until(c, ns, "m", lambda: adapters_ready(c, ns, "m") == "True"
                     and by_name(c.status(ns, "m"))["new"]["loadedReplicas"] == 2, "new loaded on both replicas")
    assert server_pods(c, ns) == pods, "no replica restarted"
