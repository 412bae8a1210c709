"""spec.autoscaling and spec.routing, the operator side: the CRD's rules, the rendered ScaledObject / HPA /
InferencePool against their own schemas, the plan step, and the real operator in the emulator.

What the emulator stands in for is in ``kube_emulator``'s docstring: no KEDA or HPA controller runs, so
the tests write ``spec.replicas`` through the VLLMModel's ``/scale`` as the autoscaler does; the
emulator's server-side apply has no field ownership, so "an apply from Git without replicas keeps
them" is shown as the emulator can (the apply leaves spec.replicas alone, and the operator never
writes spec.replicas at all), and docs/gitops.md gives the real-cluster setup.
"""

from __future__ import annotations

import datetime
import json
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import pytest_asyncio
import yaml
from kube_emulator import (
    DEPLOYMENTS,
    HOLD,
    HPAS,
    INFERENCEPOOLS,
    SCALEDOBJECTS,
    CacheOutcome,
    KubeEmulator,
    commit_for,
)
from test_chart import _contained
from test_operator_kmock import REPO, Cluster, condition, eventually, free_port, job_name, operator_on

from hub_fixtures import TINY_REPO

from vllm_operator import apis, autoscaling, crd, kube, render
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_operator.plan import Apply, Delete, Observed, plan_reconcile
from vllm_operator.plan.autoscaling_step import API_NOT_INSTALLED, plan_autoscaling
from vllm_operator.validation import compile_rule
from vllm_runtime.devhub.server import DevHub

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
POOL_SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "inferencepool-v1.schema.json").read_text())
PROMETHEUS = "http://prometheus.monitoring:9090"
SHARED = {"cache": {"accessModes": ["ReadWriteMany"]}}
KEDA = {"engine": "keda", "minReplicas": 1, "maxReplicas": 4, "metric": "queueDepth", "target": 3}
NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)


def model(**spec: Any) -> VLLMModel:
    return VLLMModel.from_body({"metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
                                "spec": {"model": "org/name", **spec}})  # fmt: skip


# --- the CRD ------------------------------------------------------------------------------------------


def test_the_max_replicas_rule_shares_the_replicas_rules_cache_condition() -> None:
    rules = {r["fieldPath"]: r["rule"] for r in crd.spec_schema()["x-kubernetes-validations"] if "fieldPath" in r}
    replicas, autoscaled = rules[".replicas"], rules[".autoscaling.maxReplicas"]
    shared = replicas.split("self.replicas <= 1 || ", 1)[1]
    assert autoscaled.endswith(shared), "the two shared-cache conditions must stay word for word the same"


def _cel_ok(spec: dict[str, Any]) -> bool:
    import cel_eval

    return cel_eval.validate({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "m"},
                              "spec": {"model": "org/name", **spec}}) == []  # fmt: skip


def test_crd_refuses_what_cannot_work() -> None:
    assert _cel_ok({"autoscaling": {"maxReplicas": 1}})
    assert not _cel_ok({"cache": {"sharing": "Shared"}, "autoscaling": {"maxReplicas": 3}}), "one volume for all"
    assert _cel_ok({**SHARED, "autoscaling": {"maxReplicas": 3}})
    assert not _cel_ok({**SHARED, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}}), "zero needs activation"
    assert not _cel_ok({**SHARED, "autoscaling": {"engine": "hpa", "minReplicas": 0, "maxReplicas": 3,
                                                    "activation": {"query": "up"}}})  # fmt: skip
    assert _cel_ok({**SHARED, "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "activation": {"query": "up"}}})
    assert not _cel_ok({**SHARED, "autoscaling": {"minReplicas": 4, "maxReplicas": 3}})


# --- rendered objects against their own schemas -------------------------------------------------------


def _rendered(kind: str) -> list[dict[str, Any]]:
    config = Config(prometheus_address=PROMETHEUS)
    objects = [r.obj for r in render.render_paths([str(p) for p in EXAMPLES], config)]
    return [o for o in objects if o["kind"] == kind]


def _scaled_objects() -> list[dict[str, Any]]:
    """Every example's ScaledObject, plus the variants the examples do not show."""
    config = Config(prometheus_address=PROMETHEUS)
    variants = [
        model(**SHARED, autoscaling={"maxReplicas": 3}),
        model(**SHARED, autoscaling={"maxReplicas": 3, "metric": "kvCacheUsage", "target": 0.75}),
        model(**SHARED, autoscaling={"maxReplicas": 3, "prometheusQuery": "sum(x)", "threshold": 2.5}),
    ]
    extra = [autoscaling.autoscaler_for(m, config) for m in variants]
    return _rendered("ScaledObject") + [o for o in extra if o is not None]


def test_every_scaled_object_validates_against_kedas_crd_models() -> None:
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
    objects = _scaled_objects()
    assert len(objects) >= 4
    for obj in objects:
        typed = keda.ScaledObject.model_validate(obj)
        dumped = typed.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert _contained(obj["spec"], dumped["spec"]), f"{obj['metadata']['name']}: a field KEDA's CRD does not know"
        assert dumped["spec"]["scaleTargetRef"] == {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                                                    "name": obj["metadata"]["name"]}  # fmt: skip


def test_kedas_models_catch_a_mistake() -> None:
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
    obj = _scaled_objects()[0]
    bad = json.loads(json.dumps(obj))
    bad["spec"]["minReplicaCount"] = "one"
    with pytest.raises(ValueError):
        keda.ScaledObject.model_validate(bad)
    typo = json.loads(json.dumps(obj))
    typo["spec"]["pollingIntervall"] = 15
    dumped = keda.ScaledObject.model_validate(typo).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert not _contained(typo["spec"], dumped["spec"]), "an unknown field is dropped, so the check sees it"


@pytest.mark.parametrize("version", ["1.29.0", "1.32.0", "1.35.0"])
def test_every_hpa_validates_against_kubernetes_schemas(version: str) -> None:
    config = Config()
    hpas = _rendered("HorizontalPodAutoscaler") + [
        autoscaling.autoscaler_for(model(**SHARED, autoscaling={"engine": "hpa", "maxReplicas": 5, "metric": m}), config)
        for m in ("queueDepth", "runningRequests", "kvCacheUsage")
    ]  # fmt: skip
    assert len(hpas) >= 4
    for obj in hpas:
        kubernetes_validate.validate(obj, version, strict=True)
    bad = json.loads(json.dumps(hpas[0]))
    bad["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = {"x": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def _pool_errors(obj: dict[str, Any]) -> list[str]:
    from celpy.adapter import json_to_cel

    errors = [e.message for e in jsonschema.Draft202012Validator(POOL_SCHEMA).iter_errors(obj)]
    ref_schema = POOL_SCHEMA["properties"]["spec"]["properties"]["endpointPickerRef"]
    ref = {"kind": "Service", **obj["spec"].get("endpointPickerRef", {})}  # the API server's default
    for rule in ref_schema["x-cel"]:
        if not bool(compile_rule(rule["rule"]).evaluate({"self": json_to_cel(ref)})):
            errors.append(rule["message"])
    return errors


def test_every_inference_pool_validates_against_its_published_schema() -> None:
    pools = _rendered("InferencePool") + [autoscaling.inference_pool_for(model(routing={"inferencePool": True}), Config())]
    assert len(pools) >= 2
    for pool in pools:
        assert pool is not None and _pool_errors(pool) == []
        assert pool["spec"]["selector"]["matchLabels"] == {
            k: v for k, v in (pool["metadata"]["labels"]).items() if k in pool["spec"]["selector"]["matchLabels"]}
    bad = json.loads(json.dumps(pools[0]))
    del bad["spec"]["endpointPickerRef"]["port"]
    assert _pool_errors(bad) == ["port is required when kind is 'Service'"]
    bad["spec"]["targetPorts"] = [{"number": 8000}, {"number": 9090}]
    assert any("too long" in e or "is too long" in e or "non-empty" in e for e in _pool_errors(bad))


def test_the_inference_pool_selects_the_model_server_pods_on_the_openai_port() -> None:
    from vllm_operator import builders

    m = model(routing={"inferencePool": True})
    pool = autoscaling.inference_pool_for(m, Config())
    assert pool is not None
    deployment = builders.deployment_for(m, Config(), "c" * 40)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in pool["spec"]["selector"]["matchLabels"].items())
    ports = [p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
    assert pool["spec"]["targetPorts"][0]["number"] in ports


# --- the plan step ------------------------------------------------------------------------------------


def _step(m: VLLMModel, **observed: Any) -> Any:
    return plan_autoscaling(m, Observed(now=NOW, **observed), Config(prometheus_address=PROMETHEUS),
                            wanted=True, deploying=False)  # fmt: skip


def test_engine_switch_deletes_only_the_operators_own_autoscaler() -> None:
    keda_model = model(**SHARED, autoscaling=KEDA)
    so = autoscaling.autoscaler_for(keda_model, Config(prometheus_address=PROMETHEUS)) or {}
    assert [r["uid"] for r in so["metadata"]["ownerReferences"]] == ["u1"]
    kedas_hpa = {"metadata": {"name": "keda-hpa-m", "labels": so["metadata"]["labels"], "ownerReferences": [
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "m", "uid": "so"}]}}  # fmt: skip
    step = _step(keda_model, scaled_objects={"m": so}, hpas={"keda-hpa-m": kedas_hpa})
    assert step.actions == (), "in line already; KEDA's own HPA is KEDA's"
    hpa_model = model(**SHARED, autoscaling={**KEDA, "engine": "hpa"})
    step = _step(hpa_model, scaled_objects={"m": so}, hpas={"keda-hpa-m": kedas_hpa})
    assert [type(a).__name__ + ":" + (a.obj["kind"] if isinstance(a, Apply) else a.resource.kind)
            for a in step.actions] == ["Apply:HorizontalPodAutoscaler", "Delete:ScaledObject"]  # fmt: skip
    step = _step(model(), scaled_objects={"m": so}, hpas={"keda-hpa-m": kedas_hpa})
    assert [(a.resource, a.name) for a in step.actions if isinstance(a, Delete)] == [(kube.SCALEDOBJECTS, "m")]
    assert step.conditions == () and step.summary is None


def test_an_api_not_installed_writes_nothing_and_says_how_to_install_it() -> None:
    m = model(**SHARED, autoscaling=KEDA, routing={"inferencePool": True})
    step = _step(m, missing_apis=frozenset({"scaledobjects", "inferencepools"}))
    assert step.actions == ()
    by_type = {c.type: c for c in step.conditions}
    assert by_type["AutoscalerReady"].reason == API_NOT_INSTALLED and "install KEDA" in by_type["AutoscalerReady"].message
    assert by_type["RoutingReady"].reason == API_NOT_INSTALLED and "Inference Extension" in by_type["RoutingReady"].message
    assert step.requeue_after == apis.RECHECK_SECONDS
    step = _step(m, unwatched_apis=frozenset({"scaledobjects"}))
    assert {c.reason for c in step.conditions if c.type == "AutoscalerReady"} == {"ApiNotWatched"}
    assert [a.obj["kind"] for a in step.actions if isinstance(a, Apply)] == ["InferencePool"]


def test_keda_without_a_prometheus_url_says_where_to_set_it() -> None:
    m = model(**SHARED, autoscaling=KEDA)
    step = plan_autoscaling(m, Observed(now=NOW), Config(), wanted=True, deploying=False)
    assert step.actions == ()
    (cond,) = step.conditions
    assert cond.reason == "NoPrometheusAddress" and "serverAddress" in cond.message


def test_the_autoscalers_own_status_decides_autoscaler_ready() -> None:
    keda_model = model(**SHARED, autoscaling=KEDA)
    so = autoscaling.autoscaler_for(keda_model, Config(prometheus_address=PROMETHEUS)) or {}
    failing = {**so, "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "ScaledObjectCheckFailed",
                                                "message": "no scaler for prometheus"}]}}  # fmt: skip
    (cond,) = _step(keda_model, scaled_objects={"m": failing}).conditions
    assert (cond.status, cond.reason) == ("False", "ScaledObjectCheckFailed") and "no scaler" in cond.message
    hpa_model = model(**SHARED, autoscaling={**KEDA, "engine": "hpa"})
    hpa = autoscaling.autoscaler_for(hpa_model, Config()) or {}
    no_metric = {**hpa, "status": {"conditions": [{"type": "ScalingActive", "status": "False",
                                                   "reason": "FailedGetPodsMetric", "message": "unable to get metric"}]}}
    (cond,) = _step(hpa_model, hpas={"m": no_metric}).conditions
    assert (cond.status, cond.reason) == ("False", "FailedGetPodsMetric")
    (cond,) = _step(hpa_model, missing_apis=frozenset({"horizontalpodautoscalers"})).conditions
    assert cond.reason == API_NOT_INSTALLED and "autoscaling/v2" in cond.message


def test_a_scale_event_quotes_the_autoscaler() -> None:
    from test_reconcile import deployment

    m = model(replicas=3, **SHARED, autoscaling=KEDA)
    kedas_hpa = {"metadata": {"name": "keda-hpa-m"}, "status": {"conditions": [
        {"type": "AbleToScale", "status": "True", "reason": "SucceededRescale",
         "message": "the HPA controller was able to update the target scale to 3"}]}}  # fmt: skip
    step = plan_autoscaling(m, Observed(now=NOW, deployment=deployment(model(**SHARED, autoscaling=KEDA), "c" * 40),
                                        hpas={"keda-hpa-m": kedas_hpa}),
                            Config(prometheus_address=PROMETHEUS), wanted=True, deploying=True)  # fmt: skip
    (event,) = [e for e in step.events if e.reason == "ScaledUp"]
    assert event.message.startswith("from 1 to 3 replicas: the keda autoscaler set spec.replicas to 3")
    assert "able to update the target scale to 3" in event.message
    assert step.summary is not None and step.summary["lastScaleReason"] in event.message
    assert step.summary["lastScaleTime"] == "2026-12-01T00:00:00Z"


def test_while_caching_only_replicas_follow() -> None:
    from test_reconcile import CONFIG, deployment

    from vllm_operator import builders
    from vllm_operator.plan.autoscaling_step import replicas_while_caching

    commit = "c" * 40
    running = deployment(model(**SHARED, autoscaling=KEDA), commit)

    def workload(m: VLLMModel, c: str) -> dict[str, Any]:
        return builders.deployment_for(m, CONFIG, c, claim_uid="pvc-uid-1")

    scaled = model(revision="v2", replicas=3, **SHARED, autoscaling=KEDA)
    follow = replicas_while_caching(scaled, Observed(now=NOW, deployment=running), workload)
    assert follow is not None and follow.obj["spec"]["replicas"] == 3
    assert follow.obj["metadata"]["annotations"][builders.ANNOTATION_COMMIT] == commit, "the running commit"
    assert follow.obj["spec"]["template"] == running["spec"]["template"], "no pod replaced"
    changed = model(revision="v2", replicas=3, dtype="float16", **SHARED, autoscaling=KEDA)
    assert replicas_while_caching(changed, Observed(now=NOW, deployment=running), workload) is None, \
        "another change waits for the new revision"
    same = model(revision="v2", **SHARED, autoscaling=KEDA)
    assert replicas_while_caching(same, Observed(now=NOW, deployment=running), workload) is None


def test_replicas_stay_within_the_autoscalers_bounds_and_zero_stays_zero() -> None:
    bounds = {"minReplicas": 2, "maxReplicas": 4}
    assert [model(replicas=r, **SHARED, autoscaling=bounds).replicas for r in (0, 1, 3, 9)] == [0, 2, 3, 4]
    assert model(replicas=9).replicas == 9, "without autoscaling spec.replicas is used as is"


def test_scaled_to_zero_is_idle_not_failed() -> None:
    m = model(replicas=0, **SHARED, autoscaling={"minReplicas": 0, "maxReplicas": 2, "activation": {"query": "up"}})
    from test_reconcile import deployment, job, observed, ok, service

    commit = "a" * 40
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", ok(commit))], deployment=deployment(m, commit, ready=0),
                                      service=service(m)), Config(prometheus_address=PROMETHEUS))  # fmt: skip
    assert plan.status["phase"] == "Idle"
    ready = condition(plan.status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ScaledToZero" and "activation" in ready["message"]
    assert condition(plan.status, "Failed")["status"] == "False"
    assert plan.status["autoscaling"]["desiredReplicas"] == 0


# --- the real operator in the emulator ----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(tiny_model_dir: Path) -> AsyncIterator[DevHub]:
    with DevHub() as devhub:
        devhub.add_repo(TINY_REPO, tiny_model_dir)
        yield devhub


def _config(hub: DevHub) -> Config:
    return Config(reconcile_interval_seconds=600, metrics_port=free_port(), hf_endpoint=hub.url,
                  prometheus_address=PROMETHEUS, surface_failures_after_seconds=2, retry_max_delay_seconds=2)  # fmt: skip


@contextlib.asynccontextmanager
async def _own_cluster(hub: DevHub, *, optional_apis: bool = True, namespaces: tuple[str, ...] = ()
                       ) -> AsyncIterator[Cluster]:  # fmt: skip
    """An emulator (``optional_apis=False``: it serves neither KEDA nor the InferencePool) and an operator."""
    async with KubeEmulator(optional_apis=optional_apis) as emu, operator_on(emu, _config(hub), namespaces) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(hub: DevHub) -> AsyncIterator[Cluster]:
    async with _own_cluster(hub) as own:
        yield own


def _replicas(cluster: Cluster, ns: str) -> int:
    return int(cluster.emu.read(DEPLOYMENTS, ns, "m")["spec"]["replicas"])  # type: ignore[index]


@pytest.mark.kmock
@pytest.mark.asyncio(loop_scope="module")
async def test_autoscaler_follows_the_spec_on_off_and_across_engines(cluster: Cluster) -> None:
    ns, emu = "onoff", cluster.emu
    await cluster.create(ns, "m", **SHARED, autoscaling=KEDA)
    await cluster.ready(ns, "m")
    await eventually(lambda: emu.read(SCALEDOBJECTS, ns, "m") is not None, "ScaledObject applied")
    so = emu.read(SCALEDOBJECTS, ns, "m")
    assert so is not None
    uid = cluster.model(ns, "m")["metadata"]["uid"]
    assert [r["uid"] for r in so["metadata"]["ownerReferences"]] == [uid]
    assert so["metadata"]["labels"]["vllm-operator.io/model"] == "m"
    assert so["spec"]["scaleTargetRef"]["kind"] == "VLLMModel"
    await eventually(lambda: condition(cluster.status(ns, "m"), "AutoscalerReady")["status"] == "True", "AutoscalerReady")
    assert cluster.status(ns, "m")["autoscaling"]["maxReplicas"] == 4
    # A spec change reaches the ScaledObject.
    await cluster.patch(ns, "m", {"spec": {"autoscaling": {"target": 5}}})
    await eventually(lambda: emu.read(SCALEDOBJECTS, ns, "m")["spec"]["triggers"][0]["metadata"]["threshold"] == "5",  # type: ignore[index]
                     "threshold updated")  # fmt: skip
    # Engine switch: the HPA replaces the ScaledObject.
    await cluster.patch(ns, "m", {"spec": {"autoscaling": {"engine": "hpa"}}})
    await eventually(lambda: emu.read(HPAS, ns, "m") is not None and emu.read(SCALEDOBJECTS, ns, "m") is None,
                     "HPA instead of the ScaledObject")  # fmt: skip
    # Off: nothing of it is left, in the cluster or in the status.
    await cluster.patch(ns, "m", {"spec": {"autoscaling": None}})
    await eventually(lambda: emu.read(HPAS, ns, "m") is None, "HPA deleted")
    await eventually(lambda: "autoscaling" not in cluster.status(ns, "m")
                     and all(c["type"] != "AutoscalerReady" for c in cluster.status(ns, "m")["conditions"]),
                     "status without autoscaling")  # fmt: skip
    assert {"AutoscalerCreated", "AutoscalerDeleted"} <= cluster.event_reasons(ns)


@pytest.mark.kmock
@pytest.mark.asyncio(loop_scope="module")
async def test_scale_to_zero_and_back_through_the_scale_subresource(cluster: Cluster) -> None:
    ns, emu = "zero", cluster.emu
    spec = {**SHARED, "routing": {"inferencePool": True},
            "autoscaling": {**KEDA, "minReplicas": 0, "activation": {"query": "sum(rate(gateway_requests[1m]))"}}}
    await cluster.create(ns, "m", **spec)
    await cluster.ready(ns, "m")
    await eventually(lambda: emu.read(INFERENCEPOOLS, ns, "m") is not None, "InferencePool applied")
    await eventually(lambda: condition(cluster.status(ns, "m"), "RoutingReady")["status"] == "True", "RoutingReady")
    await cluster.patch(ns, "m", {"spec": {"replicas": 0}}, subresource="scale")
    await eventually(lambda: _replicas(cluster, ns) == 0, "Deployment at 0")
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Idle", "phase Idle")
    status = cluster.status(ns, "m")
    assert condition(status, "Ready")["reason"] == "ScaledToZero" and condition(status, "Failed")["status"] == "False"
    assert status["autoscaling"]["desiredReplicas"] == 0 and "autoscaler" in status["autoscaling"]["lastScaleReason"]
    assert "ScaledDown" in cluster.event_reasons(ns)
    await cluster.patch(ns, "m", {"spec": {"replicas": 2}}, subresource="scale")
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Ready" and _replicas(cluster, ns) == 2, "Ready at 2")
    assert "ScaledUp" in cluster.event_reasons(ns)
    # Beyond maxReplicas (kubectl scale by hand): the Deployment stays within the bounds.
    await cluster.patch(ns, "m", {"spec": {"replicas": 9}}, subresource="scale")
    await eventually(lambda: _replicas(cluster, ns) == 4, "clamped to maxReplicas")
    assert cluster.model(ns, "m")["spec"]["replicas"] == 9, "the operator leaves spec.replicas to the autoscaler"


@pytest.mark.kmock
@pytest.mark.asyncio(loop_scope="module")
async def test_the_autoscaler_scales_while_a_new_revision_rolls_out(cluster: Cluster) -> None:
    ns, emu = "rolling", cluster.emu
    await cluster.create(ns, "m", **SHARED, autoscaling=KEDA)
    await cluster.ready(ns, "m")
    emu.outcomes["v2"] = HOLD  # v2's cache Job runs until the test finishes it
    await cluster.patch(ns, "m", {"spec": {"revision": "v2"}})
    await eventually(lambda: cluster.status(ns, "m").get("phase") == "Caching", "caching v2")
    # While v2 is cached the pods keep serving main, and still follow the autoscaler.
    await cluster.patch(ns, "m", {"spec": {"replicas": 2}}, subresource="scale")
    await eventually(lambda: _replicas(cluster, ns) == 2, "scaled while caching")
    assert cluster.deployment_commit(ns, "m") == commit_for(REPO, "main")
    await emu.finish_job(ns, job_name(ns, "m", "v2", **SHARED, autoscaling=KEDA), CacheOutcome())
    for replicas in (3, 4, 3):  # the autoscaler writes while the operator rolls v2
        await cluster.patch(ns, "m", {"spec": {"replicas": replicas}}, subresource="scale")
    await eventually(lambda: cluster.deployment_commit(ns, "m") == commit_for(REPO, "v2"), "v2 rolled out")
    await eventually(lambda: _replicas(cluster, ns) == 3 and cluster.status(ns, "m").get("phase") == "Ready",
                     "the autoscaler's last word, at v2")  # fmt: skip
    assert cluster.model(ns, "m")["spec"]["replicas"] == 3, "no replicas lost"
    assert cluster.status(ns, "m")["readyReplicas"] == 3
    # An apply from Git without replicas (kubectl apply --server-side) leaves them to the autoscaler.
    manifest = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "m", "namespace": ns},
                "spec": {"model": REPO, "revision": "v2", **SHARED, "autoscaling": KEDA}}  # fmt: skip
    async with emu.request("PATCH", f"/apis/vllm-operator.io/v1alpha1/namespaces/{ns}/vllmmodels/m",
                           params={"fieldManager": "argocd-controller", "force": "true"}, data=json.dumps(manifest),
                           headers={"Content-Type": "application/apply-patch+yaml"}) as resp:  # fmt: skip
        assert resp.status < 400, await resp.text()
    await eventually(lambda: cluster.model(ns, "m")["metadata"].get("generation", 0) >= 1, "applied")
    assert cluster.model(ns, "m")["spec"]["replicas"] == 3
    await eventually(lambda: _replicas(cluster, ns) == 3, "still 3")
    # Nobody but this test wrote the VLLMModel itself: its two writes (the revision, the apply from Git); the
    # operator wrote only /status, and the autoscaler (this test) only /scale.
    writes = [r.method for r in emu._requests if r.method in ("PATCH", "PUT", "POST", "DELETE")
              and str(r.url.path) == f"/apis/vllm-operator.io/v1alpha1/namespaces/{ns}/vllmmodels/m"]  # fmt: skip
    assert writes == ["PATCH", "PATCH"]


@pytest.mark.kmock
@pytest.mark.asyncio(loop_scope="module")
async def test_an_api_installed_later_is_used_once_it_appears(hub: DevHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apis, "RECHECK_SECONDS", 0.5)
    async with _own_cluster(hub, optional_apis=False) as cluster:
        emu, ns = cluster.emu, "later"
        await cluster.create(ns, "m", **SHARED, autoscaling=KEDA, routing={"inferencePool": True})
        await cluster.ready(ns, "m")  # the model serves; autoscaling waits for its API
        await eventually(lambda: condition(cluster.status(ns, "m"), "AutoscalerReady")["reason"] == API_NOT_INSTALLED,
                         "AutoscalerReady=False ApiNotInstalled")  # fmt: skip
        status = cluster.status(ns, "m")
        assert "install KEDA" in condition(status, "AutoscalerReady")["message"]
        assert condition(status, "RoutingReady")["reason"] == API_NOT_INSTALLED
        assert condition(status, "Failed")["status"] == "False"
        await eventually(lambda: API_NOT_INSTALLED in cluster.event_reasons(ns), "a Warning Event")
        writes = [r for r in emu._requests if r.method != "GET" and "scaledobjects" in str(r.url.path)]
        assert writes == [], "nothing half-applied"
        await emu.install(SCALEDOBJECTS)
        await eventually(lambda: emu.read(SCALEDOBJECTS, ns, "m") is not None, "ScaledObject once KEDA is there")
        await eventually(lambda: condition(cluster.status(ns, "m"), "AutoscalerReady")["status"] == "True",
                         "AutoscalerReady")  # fmt: skip
        # kopf re-scans on the CRD's event and watches the new kind (a deleted ScaledObject comes back). The
        # ScaledObject is applied by the API re-check, which can come first: delete only once the watch is live.
        await eventually(lambda: emu.watched(SCALEDOBJECTS), "a watch on ScaledObjects")
        await emu.remove(SCALEDOBJECTS, ns, "m")
        await eventually(lambda: emu.read(SCALEDOBJECTS, ns, "m") is not None, "ScaledObject re-created")
        assert condition(cluster.status(ns, "m"), "RoutingReady")["reason"] == API_NOT_INSTALLED


@pytest.mark.kmock
@pytest.mark.asyncio(loop_scope="module")
async def test_namespaced_mode_asks_for_a_restart_for_an_api_installed_later(
    hub: DevHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apis, "RECHECK_SECONDS", 0.5)
    async with _own_cluster(hub, optional_apis=False, namespaces=("llm",)) as cluster:
        emu, operator, ns = cluster.emu, cluster.operator, "llm"
        await cluster.create(ns, "m", **SHARED, autoscaling=KEDA)
        await cluster.ready(ns, "m")
        await emu.install(SCALEDOBJECTS)
        await eventually(lambda: condition(cluster.status(ns, "m"), "AutoscalerReady")["reason"] == "ApiNotWatched",
                         "ApiNotWatched: restart")  # fmt: skip
        assert "restart" in condition(cluster.status(ns, "m"), "AutoscalerReady")["message"]
        assert emu.read(SCALEDOBJECTS, ns, "m") is None
        await operator.stop()
        await operator.start()
        await eventually(lambda: emu.read(SCALEDOBJECTS, ns, "m") is not None, "applied after the restart")
        await eventually(lambda: condition(cluster.status(ns, "m"), "AutoscalerReady")["status"] == "True",
                         "AutoscalerReady")  # fmt: skip
        paths = {str(r.url.path) for r in emu._requests}
        assert not [p for p in paths if p.endswith("/customresourcedefinitions")], "no CRD observation"
        cluster_wide = {p for p in paths if "/namespaces/" not in p and p.rsplit("/", 1)[-1] in {
            "scaledobjects", "horizontalpodautoscalers", "inferencepools"}}  # fmt: skip
        assert cluster_wide == set()
