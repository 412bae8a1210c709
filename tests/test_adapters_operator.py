"""The operator's LoRA pieces without a cluster: builders (lora.py), the plan step (plan/adapters.py), the pod
reader (pod_reports.py) and the memory plan with LoRA. The whole flow runs in tests/test_adapters_kmock.py."""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hub_fixtures import TINY_REPO

from vllm_operator import builders, lora, memory
from vllm_operator import status as st
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_operator.plan import adapters as step
from vllm_operator.plan.types import Observed
from vllm_operator.pod_reports import PodReports
from test_adapters_runtime import base_facts, hub_with_adapters  # noqa: F401 - fixtures used below

from vllm_runtime.devhub.server import DevHub

NOW = datetime.datetime(2026, 12, 2, 8, 0, tzinfo=datetime.timezone.utc)
C1, C2 = "1" * 40, "2" * 40


def model(adapters: Any = (), status: dict[str, Any] | None = None, **spec: Any) -> VLLMModel:
    body = {"metadata": {"name": "m", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": {"model": "org/base", "adapters": list(adapters), **spec}, "status": status or {}}  # fmt: skip
    return VLLMModel.from_body(body)


SQL = {"name": "sql", "model": "org/sql-lora", "revision": "v1"}
VOL = {"name": "vol", "model": "pvc://loras/vol"}


def succeeded_job(m: VLLMModel, adapter: dict[str, Any], commit: str, rank: int = 8) -> tuple[str, dict[str, Any]]:
    a = lora.Adapter(adapter["name"], adapter["model"], adapter.get("revision", "main"))
    job = lora.adapter_cache_job_for(m, Config(), a)
    job["metadata"]["uid"] = f"uid-{a.name}"
    job["status"] = {"succeeded": 1, "completionTime": "2026-12-02T07:59:00Z",
                     "conditions": [{"type": "Complete", "status": "True"}]}  # fmt: skip
    message = json.dumps({"ok": True, "command": "cache", "model": a.model, "revision": a.revision, "commit": commit,
                          "bytes": 1000, "files": 2, "verified": True, "adapter": {"rank": rank}})  # fmt: skip
    pod = {"metadata": {"name": f"{job['metadata']['name']}-p", "labels": {"job-name": job["metadata"]["name"]},
                        "ownerReferences": [{"uid": job["metadata"]["uid"]}]},
           "status": {"containerStatuses": [{"name": "cache", "state": {"terminated": {"message": message}}}]}}  # fmt: skip
    return job["metadata"]["name"], {"job": job, "pod": pod}


def server_pod(name: str, ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": "server"}},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip


def report(*items: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "podIP": "10.0.0.1", "adapters": {"items": list(items)}}


def plan(m: VLLMModel, **observed: Any) -> step.AdaptersStep:
    return step.plan_adapters(m, Observed(now=NOW, **observed), Config(), claim_uid=None, ready_for_job=True,
                              hold=None, last_status=m.status)  # fmt: skip


# --- builders ------------------------------------------------------------------------------------------


def test_pod_template_depends_on_whether_adapters_are_set_never_on_the_set() -> None:
    def template(m: VLLMModel) -> Any:
        return builders.deployment_for(m, Config(), C1)["spec"]["template"]

    one, two = model([SQL]), model([SQL, {"name": "chat", "model": "org/chat-lora"}])
    assert template(one) == template(two) == template(model([]))
    assert template(model([SQL], status={"adapters": [{"name": "sql", "rank": 8}]})) == template(one)
    without = VLLMModel.from_body({"metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": "org/base"}})
    assert "--adapters-file" not in template(without)["spec"]["containers"][0]["args"]
    assert all(v["name"] != "adapters" for v in template(without)["spec"]["volumes"])


def test_per_replica_pods_cache_the_published_adapters_before_vllm_starts() -> None:
    from vllm_operator import replicas

    def template(m: VLLMModel) -> Any:
        return replicas.statefulset_for(m, Config(), C1)["spec"]["template"]

    m = model([SQL], cache={"sharing": "PerReplica"})
    assert m.per_replica
    spec = template(m)["spec"]
    (init,) = spec["initContainers"]
    assert init["args"][init["args"].index("--adapters-file") + 1] == lora.ADAPTERS_FILE
    assert {"name": "adapters", "mountPath": lora.ADAPTERS_MOUNT, "readOnly": True} in init["volumeMounts"]
    assert {"name": "adapters", "configMap": {"name": "m-adapters"}} in spec["volumes"]
    assert template(model([SQL, VOL], cache={"sharing": "PerReplica"})) != template(m), "a new claim is a new volume"
    other = model([{"name": "chat", "model": "org/chat-lora"}], cache={"sharing": "PerReplica"})
    assert template(other) == template(m), "the set never changes the template"


def test_lora_limits_spec_defaults_and_ranks() -> None:
    assert lora.limits(model([SQL])) == lora.LoraLimits(4, 16, 32)
    assert lora.limits(model([SQL], maxLoras=64)) == lora.LoraLimits(64, 16, 64)
    assert lora.limits(model([SQL], status={"adapters": [{"name": "sql", "rank": 40}]})).max_lora_rank == 64
    assert lora.limits(model([SQL], maxLoraRank=8, maxCpuLoras=5, status={"adapters": [{"name": "sql", "rank": 40}]})
                       ) == lora.LoraLimits(4, 8, 5)  # fmt: skip
    # A rank of an adapter no longer in the spec does not count.
    assert lora.limits(model([SQL], status={"adapters": [{"name": "old", "rank": 128}]})).max_lora_rank == 16


def test_the_running_rank_is_kept_while_the_spec_leaves_it_open() -> None:
    m = model([SQL], status={"adapters": [{"name": "sql", "rank": 64}]})
    running = builders.deployment_for(model([SQL]), Config(), C1)  # made when only rank <= 16 was known
    assert lora.limits(lora.with_running_rank(m, running)).max_lora_rank == 16
    assert lora.limits(lora.with_running_rank(m, None)).max_lora_rank == 64
    explicit = model([SQL], maxLoraRank=128)
    assert lora.limits(lora.with_running_rank(explicit, running)).max_lora_rank == 128


def test_adapter_cache_job_is_the_base_jobs_builder_for_the_adapter_repo() -> None:
    m = model([SQL], hfTokenSecretRef={"name": "hf"}, gpu={"type": "L4"})
    a = lora.adapters_of(m)[0]
    job = lora.adapter_cache_job_for(m, Config(), a)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "org/sql-lora" and args[args.index("--revision") + 1] == "v1"
    assert not [x for x in args if x.startswith("--plan")], "no memory planning for an adapter"
    assert job["metadata"]["annotations"][lora.ANNOTATION_ADAPTER] == "sql"
    assert job["metadata"]["name"] != builders.cache_job_name(m) and job["metadata"]["name"].startswith("m-cache-")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf", "the model's token, as a reference"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["m-cache"], "into the model's cache volume"
    # A new revision is a new Job; the same revision the same one.
    moved = model([{**SQL, "revision": "v2"}])
    assert lora.adapter_job_name(moved, lora.adapters_of(moved)[0]) != job["metadata"]["name"]
    assert lora.adapter_job_name(model([SQL]), lora.adapters_of(model([SQL]))[0]) == job["metadata"]["name"]


def test_pvc_adapters_need_no_job_and_their_claim_is_mounted() -> None:
    m = model([VOL])
    assert lora.hub_adapters(m) == []
    assert lora.file_entries(m, {}) == [{"name": "vol", "model": "pvc://loras/vol", "revision": "main"}]
    spec = builders.deployment_for(m, Config(), C1)["spec"]["template"]["spec"]
    assert {"name": "adapter-claim-0", "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}} in spec["volumes"]
    assert {"name": "adapter-claim-0", "mountPath": "/models/loras", "readOnly": True} in spec["containers"][0]["volumeMounts"]


# --- the plan step -------------------------------------------------------------------------------------


def test_a_new_adapter_gets_its_job_and_is_not_published_before_it_is_cached() -> None:
    m = model([SQL])
    out = plan(m)
    kinds = [(type(a).__name__, a.obj["kind"]) for a in out.actions]  # type: ignore[union-attr]
    assert kinds == [("Apply", "Job"), ("Apply", "ConfigMap")]
    config_map = out.actions[1].obj  # type: ignore[union-attr]
    assert json.loads(config_map["data"][lora.ADAPTERS_KEY]) == {"adapters": []}
    assert out.statuses is not None and out.statuses[0]["state"] == step.CACHING
    assert out.deploy_hold is not None, "the first Deployment waits for the adapters' caches"
    status = step.with_adapters_status({"phase": st.LOADING, "message": "rolling out"}, out, generation=1, now=NOW)
    assert status["phase"] == st.CACHING and "adapters' cache Jobs" in status["message"]


def test_cached_adapter_is_published_with_its_commit_and_rank() -> None:
    m = model([SQL])
    name, parts = succeeded_job(m, SQL, C1, rank=32)
    out = plan(m, jobs={name: parts["job"]}, pods=[parts["pod"]])
    (apply_cm,) = [a for a in out.actions if getattr(a, "obj", {}).get("kind") == "ConfigMap"]
    entries = json.loads(apply_cm.obj["data"][lora.ADAPTERS_KEY])["adapters"]  # type: ignore[union-attr]
    assert entries == [{"name": "sql", "model": "org/sql-lora", "revision": "v1", "commit": C1}]
    assert out.statuses is not None
    assert out.statuses[0]["commit"] == C1 and out.statuses[0]["rank"] == 32
    assert out.statuses[0]["cache"] == {"bytes": 1000, "files": 2, "verified": True}
    assert out.deploy_hold is None
    assert lora.limits(out.model).max_lora_rank == 32, "the Deployment starts with a rank that holds it"


def test_a_cached_repo_that_is_no_adapter_is_a_cache_failure_of_that_adapter() -> None:
    m = model([SQL])
    name, parts = succeeded_job(m, SQL, C1)
    message = json.loads(parts["pod"]["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    message["adapter"] = {"reason": "AdapterFilesMissing", "message": "adapter_config.json is missing"}
    parts["pod"]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(message)
    out = plan(m, jobs={name: parts["job"]}, pods=[parts["pod"]])
    assert out.statuses is not None and out.statuses[0]["state"] == step.CACHE_FAILED
    assert out.condition is not None and out.condition.reason == "AdapterFilesMissing"
    assert "adapter_config.json is missing" in out.condition.message


def test_a_replaced_cache_volume_caches_the_adapters_again() -> None:
    recorded = {"adapters": [{"name": "sql", "model": "org/sql-lora", "revision": "v1", "commit": C1}]}
    m = model([SQL], status=recorded)
    deployment = builders.deployment_for(m, Config(), C1, claim_uid="old-uid")

    def jobs_created(claim_uid: str) -> list[str]:
        out = step.plan_adapters(m, Observed(now=NOW, deployment=deployment), Config(), claim_uid=claim_uid,
                                 ready_for_job=True, hold=None, last_status=m.status)  # fmt: skip
        return [a.obj["metadata"]["name"] for a in out.actions if getattr(a, "obj", {}).get("kind") == "Job"]  # type: ignore[union-attr]

    assert jobs_created("old-uid") == [], "cached on this volume already (its Job has expired)"
    assert jobs_created("new-uid") == [lora.adapter_job_name(m, lora.adapters_of(m)[0])]


def test_a_new_revision_keeps_the_old_commit_published_until_cached() -> None:
    m = model([{**SQL, "revision": "v2"}],
              status={"adapters": [{"name": "sql", "model": "org/sql-lora", "revision": "v1", "commit": C1}]})
    old_cm = lora.config_map_for(m, [{"name": "sql", "model": "org/sql-lora", "revision": "v1", "commit": C1}])
    out = plan(m, config_map=old_cm)
    assert not [a for a in out.actions if getattr(a, "obj", {}).get("kind") == "ConfigMap"], "unchanged"
    assert out.statuses is not None and out.statuses[0]["servingCommit"] == C1 and "commit" not in out.statuses[0]
    assert out.statuses[0]["state"] == step.CACHING


def test_loaded_counts_only_pods_that_report_it_at_the_published_commit() -> None:
    m = model([SQL], status={"adapters": [{"name": "sql", "model": "org/sql-lora", "revision": "v1", "commit": C1}]})
    cm = lora.config_map_for(m, lora.file_entries(m, {"sql": C1}))
    pods = [server_pod("a"), server_pod("b"), server_pod("c"), server_pod("d", ready=False)]
    loaded = {"name": "sql", "commit": C1, "state": "Loaded", "loaded": True}
    reports = {"a": report(loaded), "b": report({**loaded, "commit": C2}), "c": {"ok": False, "error": "timeout"}}
    out = plan(m, config_map=cm, pods=pods, adapter_reports=reports)
    assert out.statuses is not None
    entry = out.statuses[0]
    assert (entry["loadedReplicas"], entry["readyReplicas"], entry["unknownReplicas"]) == (1, 3, 1)
    assert entry["state"] == step.LOADING
    assert out.condition is not None and out.condition.status == st.UNKNOWN
    assert out.requeue_after == step.UNKNOWN_RECHECK_SECONDS, "read again soon"
    every = {n: report(loaded) for n in "abc"}
    done = plan(m, config_map=cm, pods=pods, adapter_reports=every)
    assert done.condition is not None and (done.condition.status, done.condition.reason) == (st.TRUE, "Loaded")
    assert done.requeue_after is None


def test_a_permanent_load_failure_names_the_adapter_reason_and_fix() -> None:
    m = model([SQL, VOL], status={"adapters": [{"name": "sql", "model": "org/sql-lora", "revision": "v1",
                                                 "commit": C1}]})  # fmt: skip
    cm = lora.config_map_for(m, lora.file_entries(m, {"sql": C1}))
    failed = {"name": "sql", "commit": C1, "state": "Failed", "loaded": False, "reason": "AdapterBaseMismatch",
              "retryable": False, "message": "adapter 'sql': trained for another base model; use one for org/base"}
    vol = {"name": "vol", "commit": None, "state": "Loaded", "loaded": True}
    out = plan(m, config_map=cm, pods=[server_pod("a")], adapter_reports={"a": report(failed, vol)})
    assert out.condition is not None and out.condition.status == st.FALSE
    assert out.condition.reason == "AdapterBaseMismatch" and "adapter 'sql'" in out.condition.message
    assert out.statuses is not None
    sql, volume = out.statuses
    assert sql["state"] == step.FAILED_STATE and sql["lastError"]["reason"] == "AdapterBaseMismatch"
    assert volume["state"] == step.LOADED
    events = step.transition_events({}, {"adapters": out.statuses})
    assert [(e.type, e.reason) for e in events] == [("Warning", "AdapterFailed")]
    assert step.transition_events({"adapters": out.statuses}, {"adapters": out.statuses}) == [], "once"


def test_per_replica_a_replica_missing_a_published_adapter_gets_it_prefetched() -> None:
    from vllm_operator import replicas
    from vllm_operator.plan import replicas_step

    recorded = {"adapters": [{"name": "sql", "model": "org/sql-lora", "revision": "v1", "commit": C1}]}
    m = model([SQL], status=recorded, replicas=3, cache={"sharing": "PerReplica"})
    cm = lora.config_map_for(m, lora.file_entries(m, {"sql": C1}))
    loaded = {"name": "sql", "commit": C1, "state": "Loaded", "loaded": True}
    missing = {**loaded, "state": "Failed", "loaded": False, "reason": "AdapterNotCached", "retryable": True}
    pods = [server_pod("m-0"), server_pod("m-1"), server_pod("m-2")]
    reports = {"m-0": report(loaded), "m-1": report(missing), "m-2": report(loaded)}
    out = plan(m, config_map=cm, pods=pods, adapter_reports=reports)
    jobs = [a.obj for a in out.actions if getattr(a, "obj", {}).get("kind") == "Job"]  # type: ignore[union-attr]
    assert [j["metadata"]["name"] for j in jobs] == [replicas.prefetch_job_name(m, 1, C1)], "replica 1 only"
    (job,) = jobs
    assert job["metadata"]["annotations"][lora.ANNOTATION_ADAPTER] == "sql"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "org/sql-lora" and args[args.index("--revision") + 1] == C1
    assert "--sibling" in args
    claims = [v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == [replicas.replica_claim_name(m, 1)]
    assert out.statuses is not None and out.statuses[0]["loadedReplicas"] == 2
    # Running: not made twice; the replicas step leaves it alone; unpublished, it goes.
    running = {job["metadata"]["name"]: job}
    again = plan(m, config_map=cm, pods=pods, adapter_reports=reports, jobs=running)
    assert not [a for a in again.actions if getattr(a, "obj", {}).get("kind") == "Job"]
    assert not [a for a in again.actions if type(a).__name__ == "Delete"]
    kept = replicas_step._prefetch(m, Observed(now=NOW, jobs=running), Config(), "f" * 40)[0]
    assert not kept, "the base model's prefetch logic does not delete an adapter's prefetch"
    gone = plan(model([], replicas=3, cache={"sharing": "PerReplica"}), jobs=running)
    assert [a.name for a in gone.actions if type(a).__name__ == "Delete"] == [job["metadata"]["name"]]  # type: ignore[union-attr]


def test_removed_adapters_jobs_are_deleted_and_the_base_job_left_alone() -> None:
    m = model([SQL])
    name, parts = succeeded_job(m, SQL, C1)
    base = builders.cache_job_for(m, Config())
    out = plan(model([]), jobs={name: parts["job"], base["metadata"]["name"]: base}, pods=[parts["pod"]])
    deleted = [a.name for a in out.actions if type(a).__name__ == "Delete"]  # type: ignore[union-attr]
    assert deleted == [name]


# --- the pod reader ------------------------------------------------------------------------------------


async def test_pod_reports_read_in_the_background_bounded_and_unknown_on_failure() -> None:
    answers: dict[str, Any] = {"a": {"adapters": {"items": []}}, "b": "slow", "c": "no-section"}

    async def status(request: web.Request) -> web.Response:
        kind = answers[request.match_info["pod"]]
        if kind == "slow":
            await asyncio.sleep(5)
        if kind == "no-section":
            return web.json_response({"ready": True})
        return web.json_response(kind)

    app = web.Application()
    app.router.add_get("/{pod}", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    changed: list[tuple[str, str]] = []
    reader = PodReports(on_change=changed.append, timeout=0.5, min_interval=60,
                        url_for=lambda pod: f"http://127.0.0.1:{port}/{pod['metadata']['name']}")  # fmt: skip
    pods = [server_pod(n) for n in "abc"]
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert reader.snapshot(("ns", "m"), pods) == {}, "nothing read yet: unknown"
        assert loop.time() - began < 0.1, "snapshot never waits for a pod"
        deadline = loop.time() + 10
        while not changed and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert changed == [("ns", "m")]
        got = reader.snapshot(("ns", "m"), pods)
        assert got["a"]["ok"] is True and got["a"]["adapters"] == {"items": []}
        assert got["b"]["ok"] is False and "did not answer" in got["b"]["error"]
        assert got["c"]["ok"] is False and "no adapters section" in got["c"]["error"]
        assert reader.snapshot(("ns", "m"), pods[:1]).keys() == {"a"}, "only the pods asked about"
        reader.forget(("ns", "m"))
        assert reader.tracked() == set()
    finally:
        await reader.close()
        await runner.cleanup()


# --- the memory plan ------------------------------------------------------------------------------------


async def test_memory_plan_counts_lora_and_refuses_what_cannot_fit(tiny_model_dir: Path) -> None:
    with DevHub() as hub:
        hub.add_repo(TINY_REPO, tiny_model_dir)
        config = Config(hf_endpoint=hub.url)

        def tiny(**spec: Any) -> VLLMModel:
            body = {"metadata": {"name": "t", "namespace": "ns"},
                    "spec": {"model": TINY_REPO, "gpu": {"memory": "2Gi"}, "maxModelLen": 128, **spec}}  # fmt: skip
            return VLLMModel.from_body(body)

        plain = await memory.memory_plan(tiny(), config)
        small = await memory.memory_plan(tiny(adapters=[]), config)
        huge = await memory.memory_plan(tiny(adapters=[], maxLoras=256, maxLoraRank=512, maxCpuLoras=256), config)
    assert plain.status == st.TRUE and small.status == st.TRUE, (plain.message, small.message)
    assert (small.plan or {}).get("loraBytesPerGPU", 0) > 0
    assert huge.status == st.FALSE and huge.reason == memory.DOES_NOT_FIT, huge.message
    assert memory.planning_key(tiny(adapters=[])) != memory.planning_key(tiny(adapters=[], maxLoras=8))
    assert memory.plan_digest(tiny(adapters=[])) == memory.plan_digest(tiny(adapters=[], maxLoras=8)), (
        "the cache Job's plan digest ignores LoRA: a limit change never re-runs the base model's Job")


# --- with the real runtime: the plain cache command's summary and the converger's /status -----------------------


def test_operator_and_runtime_agree_on_the_summary_the_file_and_the_status(
    devhub: DevHub, hub_with_adapters: dict[str, Any], base_facts: Any, tmp_path: Path
) -> None:
    """What each per-adapter cache Job's pod reports (the real ``vllm-runtime cache`` of the Job's own args) gives
    status.adapters its commit, bytes and rank; the ConfigMap the operator builds is a file the real converger
    loads from; and the converger's own ``status()`` (what /status serves) is read as loaded / failed."""
    from test_adapters_runtime import Clock, Gauges, ScriptedAPI

    from vllm_runtime import cli
    from vllm_runtime.adapters.converge import AdapterConverger

    m = model([{"name": "sql", "model": "test-org/sql-lora"}, {"name": "high", "model": "test-org/high-lora"}])
    cache = tmp_path / "cache"
    jobs, pods = {}, []
    for adapter in lora.hub_adapters(m):
        job = lora.adapter_cache_job_for(m, Config(), adapter)
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        term = tmp_path / f"{adapter.name}.term"
        run = [*args[:args.index("--cache-dir") + 1], str(cache), "--termination-message-path", str(term)]
        assert cli.main(run) == 0, run
        job["metadata"]["uid"] = f"uid-{adapter.name}"
        job["status"] = {"succeeded": 1, "completionTime": "2026-12-02T07:59:00Z",
                         "conditions": [{"type": "Complete", "status": "True"}]}  # fmt: skip
        jobs[job["metadata"]["name"]] = job
        pods.append({"metadata": {"name": f"{adapter.name}-p", "ownerReferences": [{"uid": job["metadata"]["uid"]}]},
                     "status": {"containerStatuses": [{"name": "cache", "state": {"terminated": {
                         "message": term.read_text()}}}]}})  # fmt: skip
    out = plan(m, jobs=jobs, pods=pods)
    assert out.statuses is not None
    sql, high = out.statuses
    assert sql["commit"] == hub_with_adapters["sql"][-1] and sql["rank"] == 8 and sql["cache"]["verified"] is True
    assert high["rank"] == 64 and high["cache"]["bytes"] > 0
    (config_map,) = [a.obj for a in out.actions if getattr(a, "obj", {}).get("kind") == "ConfigMap"]  # type: ignore[union-attr]
    file = tmp_path / lora.ADAPTERS_KEY
    file.write_text(config_map["data"][lora.ADAPTERS_KEY])

    # The server started with the rank the operator chose before the rank-64 adapter existed (16): vLLM's limit.
    api = ScriptedAPI()
    converger = AdapterConverger(adapters_file=file, api=api, cache_dir=cache, base_config=base_facts[0],  # type: ignore[arg-type]
                                 base_tensors=base_facts[1], max_lora_rank=16, served_names=("org/base",),
                                 clock=Clock(), metrics=Gauges())  # fmt: skip
    converger.step()
    assert set(api.loaded) == {"sql"}
    published = model(m.spec["adapters"], status={"adapters": out.statuses})
    pod_report = {"ok": True, "podIP": "10.0.0.1", "adapters": json.loads(json.dumps(converger.status()))}
    after = plan(published, jobs=jobs, pods=[*pods, server_pod("server-0")], config_map=config_map,
                 adapter_reports={"server-0": pod_report})  # fmt: skip
    assert after.statuses is not None
    by = {s["name"]: s for s in after.statuses}
    assert by["sql"]["state"] == step.LOADED and by["sql"]["loadedReplicas"] == 1
    assert by["high"]["state"] == step.FAILED_STATE and by["high"]["lastError"]["reason"] == "AdapterRankTooHigh"
    assert after.condition is not None and after.condition.reason == "AdapterRankTooHigh"
    assert "maxLoraRank" in after.condition.message and "'high'" in after.condition.message
