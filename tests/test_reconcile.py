"""Pure planning and status: what the reconcile loop decides for each actual state (no API, no kopf)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from vllm_operator import builders, kube
from vllm_operator import status as st
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_operator.memory import PLANNING, MemoryPlan, from_summary, memory_plan
from vllm_operator.plan import (
    ANNOTATION_CLAIM_UID,
    ANNOTATION_PLAN_DIGEST,
    ANNOTATION_SPEC_HASH,
    RESULT_WAIT,
    RETRY_FAILED_CACHE_AFTER,
    Apply,
    Delete,
    Observed,
    Plan,
    is_subset,
    plan_reconcile,
    transition_events,
)

NOW = datetime.datetime(2026, 11, 27, 21, 0, 0, tzinfo=datetime.timezone.utc)
OLD = "a" * 40
NEW = "b" * 40
CONFIG = Config()


def model(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> VLLMModel:
    body = {
        "apiVersion": "vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "uid-1", "generation": generation},
        "spec": {"model": "org/tiny", **spec},
        "status": status or {},
    }
    return VLLMModel.from_body(body)


def pvc(phase: str = "Bound", created: datetime.datetime = NOW, uid: str = "pvc-uid-1") -> dict[str, Any]:
    obj = builders.cache_pvc_for(model(), CONFIG)
    assert obj is not None
    obj["metadata"]["creationTimestamp"] = st.now_iso(created)
    obj["metadata"]["uid"] = uid
    obj["status"] = {"phase": phase}
    return obj


def job(m: VLLMModel, phase: str, message: dict[str, Any] | None = None, *, stale: bool = False,
        finished: datetime.datetime = NOW, claim_uid: str = "pvc-uid-1",
        plan_digest: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """A cache Job in ``phase`` and its pod, whose termination message is ``message``."""
    obj = builders.cache_job_for(m, CONFIG, claim_uid=claim_uid)
    obj["metadata"]["uid"] = "job-uid-" + obj["metadata"]["name"]
    if stale:
        obj["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = "stale"
    if plan_digest:
        obj["metadata"]["annotations"][ANNOTATION_PLAN_DIGEST] = plan_digest
    status: dict[str, Any] = {"active": 1} if phase == "running" else {}
    if phase == "succeeded":
        status = {"succeeded": 1, "completionTime": st.now_iso(finished),
                  "conditions": [{"type": "Complete", "status": "True"}]}  # fmt: skip
    elif phase == "failed":
        status = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                               "lastTransitionTime": st.now_iso(finished)}]}  # fmt: skip
    obj["status"] = status
    state: dict[str, Any] = {"running": {}}
    if message is not None:
        state = {"terminated": {"exitCode": 0 if message.get("ok") else 3, "message": json.dumps(message)}}
    pod = {
        "metadata": {"name": obj["metadata"]["name"] + "-x", "labels": {"job-name": obj["metadata"]["name"]},
                     "ownerReferences": [{"uid": obj["metadata"]["uid"]}]},  # fmt: skip
        "status": {"containerStatuses": [{"name": "cache", "image": "img", "state": state}]},
    }
    return obj, [pod]


def ok(commit: str, revision: str = "main") -> dict[str, Any]:
    return {"ok": True, "command": "cache", "model": "org/tiny", "revision": revision, "commit": commit,
            "bytes": 3 * 2**20, "files": 4, "verified": True, "completedAt": "2026-11-27T20:59:00Z"}  # fmt: skip


def failed(reason: str, message: str = "detail") -> dict[str, Any]:
    return {"ok": False, "command": "cache", "model": "org/tiny", "revision": "main", "reason": reason,
            "message": message}  # fmt: skip


def deployment(m: VLLMModel, commit: str, ready: int = 1, replicas: int | None = None) -> dict[str, Any]:
    obj = builders.deployment_for(m, CONFIG, commit, claim_uid="pvc-uid-1")
    obj["metadata"]["generation"] = 1
    n = m.replicas if replicas is None else replicas
    obj["spec"]["replicas"] = n
    obj["status"] = {"observedGeneration": 1, "replicas": n, "updatedReplicas": n, "readyReplicas": ready}
    return obj


def service(m: VLLMModel) -> dict[str, Any]:
    return builders.service_for(m, CONFIG)


def observed(m: VLLMModel, *, jobs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = (),  # type: ignore[assignment]
             **kw: Any) -> Observed:  # fmt: skip
    kw.setdefault("pvc", pvc())
    return Observed(now=NOW, jobs={j["metadata"]["name"]: j for j, _ in jobs},
                    pods=kw.pop("pods", []) + [p for _, ps in jobs for p in ps], **kw)  # fmt: skip


def kinds(actions: list[Any]) -> list[str]:
    return [f"{type(a).__name__}:{a.obj['kind'] if isinstance(a, Apply) else a.resource.kind}" for a in actions]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = st.find(status["conditions"], type_)
    assert found is not None
    return dict(found)


# --- the flow, one actual state at a time ------------------------------------------------------------


def test_new_model_creates_cache_pvc_then_the_job_that_fills_it() -> None:
    m = model()
    plan = plan_reconcile(m, observed(m, pvc=None), CONFIG)
    assert kinds(plan.actions) == ["Apply:PersistentVolumeClaim"], "the Job waits for the PVC (its uid)"
    pvc_obj = plan.actions[0].obj  # type: ignore[union-attr]
    assert "ownerReferences" not in pvc_obj["metadata"], "Retain: the cache outlives the model"
    assert plan.status["phase"] == "Caching"
    plan = plan_reconcile(m, observed(m), CONFIG)
    assert kinds(plan.actions) == ["Apply:Job"]
    job_obj = plan.actions[0].obj  # type: ignore[union-attr]
    assert job_obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job_obj["metadata"]["annotations"][ANNOTATION_CLAIM_UID] == "pvc-uid-1"
    assert [e.reason for e in plan.events] == ["CacheStarted"]
    assert plan.status["phase"] == "Caching"
    assert condition(plan.status, "Cached")["status"] == "False"
    assert condition(plan.status, "Ready")["reason"] == "WaitingForCache"
    assert "resolvedRevision" not in plan.status


def test_delete_policy_gives_the_pvc_an_owner() -> None:
    m = model(cache={"deletePolicy": "Delete"})
    plan = plan_reconcile(m, observed(m, pvc=None), CONFIG)
    assert plan.actions[0].obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # type: ignore[union-attr]


def test_running_job_waits() -> None:
    m = model()
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "running")]), CONFIG)
    assert plan.actions == []
    assert plan.status["phase"] == "Caching"


def test_succeeded_job_deploys_its_commit_and_service() -> None:
    m = model()
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", ok(NEW))]), CONFIG)
    assert kinds(plan.actions) == ["Apply:Deployment", "Apply:Service"]
    dep = plan.actions[0].obj  # type: ignore[union-attr]
    assert dep["metadata"]["annotations"][builders.ANNOTATION_COMMIT] == NEW
    assert NEW in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert plan.status["resolvedRevision"] == NEW
    assert plan.status["cache"] == {"commit": NEW, "revision": "main", "bytes": 3 * 2**20, "files": 4,
                                    "verified": True, "completedAt": "2026-11-27T20:59:00Z", "claimName": "m-cache"}  # fmt: skip
    assert plan.status["phase"] == "Loading"
    assert condition(plan.status, "Cached")["status"] == "True"
    assert "3.0 MiB" in condition(plan.status, "Cached")["message"]
    assert [e.reason for e in plan.events] == ["Deployed"]


def test_ready_deployment_is_left_alone_and_reported_ready() -> None:
    m = model()
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW), service=service(m))
    plan = plan_reconcile(m, obs, CONFIG)
    assert plan.actions == []
    assert plan.status["phase"] == "Ready"
    assert condition(plan.status, "Ready")["status"] == "True"
    assert plan.status["readyReplicas"] == 1
    assert plan.status["endpoint"] == "http://m.ns.svc:8000/v1"
    assert plan.status["selector"] == builders.selector_string(m)


def test_revision_change_caches_first_and_keeps_the_old_deployment() -> None:
    m = model(revision="v2", status={"resolvedRevision": OLD})
    old = model()
    obs = observed(m, jobs=[job(old, "succeeded", ok(OLD))], deployment=deployment(old, OLD), service=service(m))
    plan = plan_reconcile(m, obs, CONFIG)
    assert kinds(plan.actions) == ["Delete:Job", "Apply:Job"], "the Deployment is untouched until the new commit is cached"
    assert plan.actions[0] == Delete(kube.JOBS, "ns", builders.cache_job_name(old),
                                     "org/tiny@main is no longer the spec's org/tiny@v2")  # fmt: skip
    assert "v2" in plan.actions[1].obj["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[union-attr]
    assert plan.status["resolvedRevision"] == OLD
    assert condition(plan.status, "Ready")["status"] == "True", "old pods keep serving"
    assert plan.status["phase"] == "Caching"


def test_revision_change_rolls_once_the_new_commit_is_cached() -> None:
    m = model(revision="v2")
    old = model()
    jobs = [job(old, "succeeded", ok(OLD)), job(m, "succeeded", ok(NEW, "v2"))]
    plan = plan_reconcile(m, observed(m, jobs=jobs, deployment=deployment(old, OLD), service=service(m)), CONFIG)
    assert kinds(plan.actions) == ["Delete:Job", "Apply:Deployment"], "the old revision's Job is not needed"
    assert plan.actions[1].obj["metadata"]["annotations"][builders.ANNOTATION_COMMIT] == NEW  # type: ignore[union-attr]
    assert plan.status["resolvedRevision"] == NEW
    assert plan.status["phase"] == "Loading"


def test_scale_copies_replicas_to_the_deployment() -> None:
    # A shared (ReadWriteMany) cache: a Deployment; 3 replicas also get a disruption budget (plan.replicas_step).
    m = model(replicas=3, cache={"accessModes": ["ReadWriteMany"]})
    one = model(cache={"accessModes": ["ReadWriteMany"]})
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(one, NEW), service=service(m))
    plan = plan_reconcile(m, obs, CONFIG)
    assert kinds(plan.actions) == ["Apply:Deployment", "Apply:PodDisruptionBudget"]
    assert plan.actions[0].obj["spec"]["replicas"] == 3  # type: ignore[union-attr]
    assert [e.reason for e in plan.events] == ["ScaledUp"], "same commit: scaling is not a new deployment"
    assert plan.events[0].message.startswith("from 1 to 3 replicas: spec.replicas set to 3")


def test_scaled_to_zero() -> None:
    m = model(replicas=0)
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW, ready=0), service=service(m))
    plan = plan_reconcile(m, obs, CONFIG)
    assert condition(plan.status, "Ready")["reason"] == "ScaledToZero"
    assert plan.status["phase"] == "Idle", "scaled to zero is not a failure, nor waiting"


def test_children_deleted_by_hand_come_back() -> None:
    m = model()
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", ok(NEW))]), CONFIG)
    assert kinds(plan.actions) == ["Apply:Deployment", "Apply:Service"]


def test_cached_revision_needs_no_new_job_after_the_job_is_gone() -> None:
    m = model()
    plan = plan_reconcile(m, observed(m, deployment=deployment(m, NEW), service=service(m)), CONFIG)
    assert plan.actions == []
    assert plan.status["resolvedRevision"] == NEW


@pytest.mark.parametrize(
    ("reason", "must_mention"),
    [
        ("GatedRepo", "spec.hfTokenSecretRef"),
        ("Unauthorized", "spec.hfTokenSecretRef"),
        ("RepoNotFound", "spec.model"),
        ("RevisionNotFound", "spec.revision"),
        ("InsufficientSpace", "spec.cache.size"),
        ("SomethingNew", "detail"),
    ],
)
def test_failed_cache_job_reports_reason_and_what_to_do(reason: str, must_mention: str) -> None:
    m = model()
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "failed", failed(reason))]), CONFIG)
    assert plan.actions == [], "a permanent failure is not retried until the spec changes"
    assert plan.status["phase"] == "Failed"
    cond = condition(plan.status, "Failed")
    assert (cond["status"], cond["reason"]) == ("True", reason)
    assert must_mention in cond["message"]
    assert condition(plan.status, "Cached")["reason"] == "CacheFailed"


def test_failed_job_is_replaced_once_the_spec_changes() -> None:
    m = model(hfTokenSecretRef={"name": "hf"})
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "failed", failed("GatedRepo"), stale=True)]), CONFIG)
    assert plan.actions == [Delete(kube.JOBS, "ns", builders.cache_job_name(m), "the spec changed since it failed")]


def test_transient_failure_is_retried_after_a_while() -> None:
    m = model()
    recent = job(m, "failed", failed("HubUnavailable"), finished=NOW - datetime.timedelta(seconds=30))
    assert plan_reconcile(m, observed(m, jobs=[recent]), CONFIG).actions == []
    old = job(m, "failed", failed("HubUnavailable"), finished=NOW - datetime.timedelta(minutes=10))
    assert kinds(plan_reconcile(m, observed(m, jobs=[old]), CONFIG).actions) == ["Delete:Job"]


def test_image_pull_failure_of_the_cache_pod() -> None:
    m = model()
    j, pods = job(m, "running")
    pods[0]["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "ImagePullBackOff", "message": "not found"}
    }
    plan = plan_reconcile(m, observed(m, jobs=[(j, pods)]), CONFIG)
    cond = condition(plan.status, "Failed")
    assert cond["reason"] == "ImagePullFailed" and "spec.imagePullSecrets" in cond["message"]


def test_crash_looping_vllm_reports_the_pods_termination_message() -> None:
    m = model()
    crash = {"ok": False, "command": "serve", "reason": "OutOfMemory", "message": "lower spec.maxModelLen"}
    pod = {
        "metadata": {"name": "m-abc", "labels": builders.labels_for(m, "server")},
        "status": {"containerStatuses": [{
            "name": "vllm", "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 3, "message": json.dumps(crash)}},
        }]},
    }  # fmt: skip
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW, ready=0),
                   service=service(m), pods=[pod])  # fmt: skip
    plan = plan_reconcile(m, obs, CONFIG)
    cond = condition(plan.status, "Failed")
    assert cond["reason"] == "CrashLoopBackOff"
    assert "OutOfMemory: lower spec.maxModelLen" in cond["message"] and "restarts: 4" in cond["message"]


def test_pvc_not_bound_after_the_grace_period() -> None:
    m = model()
    fresh = plan_reconcile(m, observed(m, pvc=pvc("Pending"), jobs=[job(m, "running")]), CONFIG)
    assert condition(fresh.status, "Failed")["status"] == "False", "WaitForFirstConsumer binds late"
    stuck = pvc("Pending", created=NOW - datetime.timedelta(minutes=10))
    plan = plan_reconcile(m, observed(m, pvc=stuck, jobs=[job(m, "running")]), CONFIG)
    assert condition(plan.status, "Failed")["reason"] == "PVCNotBound"


def test_existing_claim_is_used_and_checked() -> None:
    m = model(cache={"existingClaim": "shared"})
    plan = plan_reconcile(m, observed(m, pvc=None), CONFIG)
    assert kinds(plan.actions) == ["Apply:Job"]
    assert condition(plan.status, "Failed")["reason"] == "PVCNotFound"


def test_memory_plan_lands_in_status() -> None:
    m = model()
    fits = MemoryPlan(st.FALSE, "DoesNotFit", "needs 20 GiB", {"fits": False, "weight_bytes": 1})
    plan = plan_reconcile(m, observed(m, memory=fits), CONFIG)
    assert condition(plan.status, "MemoryFits")["reason"] == "DoesNotFit"
    assert plan.status["plan"] == {"fits": False, "weight_bytes": 1}


async def test_memory_plan_is_unknown_without_a_gpu() -> None:
    result = await memory_plan(model(), CONFIG)
    assert (result.status, result.reason) == ("Unknown", "NoGPUSpecified")


# --- status helpers ----------------------------------------------------------------------------------


def test_last_transition_time_is_kept_while_status_holds() -> None:
    before = st.merge_conditions([], [st.Condition("Ready", "False", "Loading")], generation=1, now=NOW)
    later = NOW + datetime.timedelta(minutes=1)
    same = st.merge_conditions(before, [st.Condition("Ready", "False", "Other")], generation=2, now=later)
    assert same[0]["lastTransitionTime"] == before[0]["lastTransitionTime"]
    assert same[0]["observedGeneration"] == 2
    flipped = st.merge_conditions(before, [st.Condition("Ready", "True", "Serving")], generation=2, now=later)
    assert flipped[0]["lastTransitionTime"] == st.now_iso(later)


def test_status_patch_only_carries_changes() -> None:
    assert st.status_patch({"phase": "Ready", "kopf": {}}, {"phase": "Ready"}) == {}
    assert st.status_patch({"phase": "Ready", "endpoint": "x"}, {"phase": "Loading"}) == {
        "phase": "Loading",
        "endpoint": None,
    }


def test_events_only_on_transitions() -> None:
    m = model()
    loading = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", ok(NEW))]), CONFIG).status
    ready_obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW), service=service(m))
    ready = plan_reconcile(m, ready_obs, CONFIG).status
    assert [e.reason for e in transition_events(m, {}, loading)] == ["CacheFinished"]
    assert [e.reason for e in transition_events(m, loading, ready)] == ["Ready"]
    assert transition_events(m, ready, ready) == []


def test_is_subset_tolerates_server_defaults_and_quantity_text() -> None:
    assert is_subset({"a": {"b": 1}, "l": [{"x": 1}]}, {"a": {"b": "1", "c": 2}, "l": [{"x": 1, "y": 0}]})
    assert not is_subset({"l": [1, 2]}, {"l": [1]})
    assert not is_subset({"a": {"b": 1}}, {"a": {"b": 2}})


class _FakePlan:
    def __init__(self, fits: bool | None, reason: str, suggestions: list[str]) -> None:
        self.fits, self.reason, self.suggestions = fits, reason, suggestions

    def summary(self) -> dict[str, Any]:
        return {"fits": self.fits, "reason": self.reason, "weightBytes": 10, "suggestions": self.suggestions}


@pytest.mark.parametrize(
    ("outcome", "status", "reason"),
    [
        (_FakePlan(True, "fits with 3 GiB to spare", []), "True", "Fits"),
        (_FakePlan(False, "needs 20 GiB, has 16 GiB", ["set spec.quantization: awq"]), "False", "DoesNotFit"),
        (_FakePlan(None, "no GPU size", []), "Unknown", "NoVerdict"),
        (RuntimeError("hub unreachable"), "Unknown", "PlanFailed"),
    ],
)
async def test_memory_plan_maps_the_planners_verdict(
    monkeypatch: pytest.MonkeyPatch, outcome: Any, status: str, reason: str
) -> None:
    from vllm_runtime import planner

    seen: dict[str, Any] = {}

    def fake_plan_model(model: str, **kwargs: Any) -> Any:
        seen.update(kwargs, model=model)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(planner, "plan_model", fake_plan_model)
    result = await memory_plan(model(gpu={"type": "L4"}, maxModelLen="auto"), CONFIG)
    assert (result.status, result.reason) == (status, reason)
    assert seen["model"] == "org/tiny" and seen["gpu"] == "L4" and seen["max_model_len"] == "auto"
    if isinstance(outcome, _FakePlan):
        assert result.plan is not None and result.plan["weightBytes"] == 10
        assert all(s in result.message for s in outcome.suggestions)


async def test_memory_plan_needs_a_hub_model() -> None:
    result = await memory_plan(model(gpu={"type": "L4"}, model="pvc://weights/llama"), CONFIG)
    assert (result.status, result.reason) == ("Unknown", "NotAHubModel")


# --- the memory plan decides before anything is created ----------------------------------------------

GPU: dict[str, Any] = {"gpu": {"type": "L4"}}


def memory_of(fits: bool | None, source: str = "operator", **plan: Any) -> MemoryPlan:
    summary = {"fits": fits, "reason": "needs 20 GiB, has 16 GiB" if fits is False else "fits", "weightBytes": 10,
               "suggestions": ["set spec.quantization: awq"] if fits is False else [], **plan}  # fmt: skip
    return from_summary(summary, source)


def test_nothing_is_created_while_the_plan_is_being_made() -> None:
    m = model(**GPU)
    plan = plan_reconcile(m, observed(m, pvc=None, memory=PLANNING), CONFIG)
    assert plan.actions == [] and plan.events == []
    assert plan.status["phase"] == "Pending"
    assert (condition(plan.status, "MemoryFits")["status"], condition(plan.status, "MemoryFits")["reason"]) == (
        "Unknown", "Planning")  # fmt: skip
    assert condition(plan.status, "Cached")["reason"] == "WaitingForPlan"


def test_a_spec_that_does_not_fit_creates_nothing_and_says_what_would() -> None:
    m = model(**GPU)
    plan = plan_reconcile(m, observed(m, pvc=None, memory=memory_of(False)), CONFIG)
    assert plan.actions == [], "no PVC, no Job, no Deployment"
    assert plan.status["phase"] == "Failed"
    fits, failed_ = condition(plan.status, "MemoryFits"), condition(plan.status, "Failed")
    assert (fits["status"], fits["reason"]) == ("False", "DoesNotFit")
    assert (failed_["status"], failed_["reason"]) == ("True", "DoesNotFit")
    assert "needs 20 GiB" in failed_["message"] and "spec.quantization: awq" in failed_["message"]
    assert condition(plan.status, "Stalled") == {**failed_, "type": "Stalled"}, "kstatus' Stalled mirrors Failed"
    assert plan.status["plan"]["source"] == "operator"
    events = transition_events(m, {}, plan.status)
    assert [(e.type, e.reason) for e in events] == [("Warning", "DoesNotFit")]
    again = plan_reconcile(model(status=plan.status, **GPU), observed(m, pvc=None, memory=memory_of(False)), CONFIG)
    assert transition_events(m, plan.status, again.status) == [], "the Warning is posted once"


def test_a_new_spec_that_does_not_fit_keeps_the_serving_deployment() -> None:
    old = model(**GPU)
    m = model(generation=2, maxModelLen=131072, **GPU)
    obs = observed(m, jobs=[job(m, "succeeded", ok(OLD))], deployment=deployment(old, OLD), service=service(old),
                   memory=memory_of(False))  # fmt: skip
    plan = plan_reconcile(m, obs, CONFIG)
    assert plan.actions == [], "the Deployment is not rolled to a spec that cannot fit"
    assert plan.status["resolvedRevision"] == OLD and plan.status["phase"] == "Failed"
    assert condition(plan.status, "Ready")["status"] == "True", "the old pods keep serving"


def test_when_the_operator_cannot_plan_the_cache_job_plans() -> None:
    m = model(maxModelLen="auto", **GPU)
    cannot = MemoryPlan(st.UNKNOWN, "PlanFailed", "the memory planner failed: GatedRepoError")
    first = plan_reconcile(m, observed(m, memory=cannot), CONFIG)
    assert kinds(first.actions) == ["Apply:Job"], "caching goes ahead"
    job_obj = first.actions[0].obj  # type: ignore[union-attr]
    args = job_obj["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--plan-gpu") + 1] == "L4" and args[args.index("--plan-max-model-len") + 1] == "auto"
    digest = job_obj["metadata"]["annotations"][ANNOTATION_PLAN_DIGEST]

    fits = {**ok(NEW), "plan": {"fits": True, "reason": "fits", "maxModelLen": 8192, "chosen": {"maxModelLen": 8192}}}
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", fits, plan_digest=digest)], memory=cannot), CONFIG)
    assert kinds(plan.actions) == ["Apply:Deployment", "Apply:Service"]
    dep_args = plan.actions[0].obj["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[union-attr]
    assert dep_args[dep_args.index("--max-model-len") + 1] == "8192", "auto comes from the cache Job's plan"
    assert plan.status["plan"]["source"] == "cacheJob" and plan.status["plan"]["chosen"] == {"maxModelLen": 8192}
    assert condition(plan.status, "MemoryFits")["status"] == "True"
    assert "maxModelLen=8192" in condition(plan.status, "MemoryFits")["message"], "status says what was chosen"
    # Once the Job is cleaned up, the plan in status still counts (same inputs).
    later = plan_reconcile(model(status=plan.status, maxModelLen="auto", **GPU),
                           observed(m, deployment=deployment(m, NEW), service=service(m), memory=cannot), CONFIG)  # fmt: skip
    assert not [a for a in later.actions if isinstance(a, Apply) and a.obj["kind"] == "Job"]
    assert condition(later.status, "MemoryFits")["status"] == "True"


def test_the_cache_jobs_does_not_fit_keeps_the_deployment_away() -> None:
    m = model(**GPU)
    cannot = MemoryPlan(st.UNKNOWN, "PlanFailed", "hub unreachable")
    digest = builders_plan_digest(m)
    too_big = {**ok(NEW), "plan": {"fits": False, "reason": "needs 20 GiB", "suggestions": ["use 2 GPUs"]}}
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", too_big, plan_digest=digest)], memory=cannot),
                          CONFIG)  # fmt: skip
    assert plan.actions == []
    assert plan.status["phase"] == "Failed" and condition(plan.status, "Failed")["reason"] == "DoesNotFit"
    assert "use 2 GPUs" in condition(plan.status, "Failed")["message"]
    assert "cache Job" in condition(plan.status, "MemoryFits")["message"]
    assert condition(plan.status, "Cached")["status"] == "True"
    # The spec changes (fewer tokens): the Job's plan is for other inputs, so it runs again (files are cached).
    fixed = model(maxModelLen=2048, **GPU)
    replan = plan_reconcile(fixed, observed(fixed, jobs=[job(m, "succeeded", too_big, plan_digest=digest)],
                                            memory=cannot), CONFIG)  # fmt: skip
    assert kinds(replan.actions) == ["Delete:Job"]


def builders_plan_digest(m: VLLMModel) -> str:
    from vllm_operator.memory import plan_digest

    return plan_digest(m)


def test_a_replaced_cache_pvc_is_filled_again() -> None:
    m = model()
    old_job = job(m, "succeeded", ok(NEW), claim_uid="pvc-uid-0")
    obs = observed(m, jobs=[old_job], deployment=deployment(m, NEW), service=service(m))
    plan = plan_reconcile(m, obs, CONFIG)
    assert kinds(plan.actions) == ["Delete:Job"], "the Job filled the old PVC: run it again"
    assert [e.reason for e in plan.events] == ["CacheVolumeReplaced"]
    assert condition(plan.status, "Ready")["status"] == "True", "the pods keep serving meanwhile"
    # The Job is gone, and the Deployment was made from the old PVC too: cache again, do not trust it.
    stale_dep = deployment(m, NEW)
    stale_dep["metadata"]["annotations"][ANNOTATION_CLAIM_UID] = "pvc-uid-0"
    plan = plan_reconcile(m, observed(m, deployment=stale_dep, service=service(m)), CONFIG)
    assert kinds(plan.actions) == ["Apply:Job"]
    assert plan.actions[0].obj["metadata"]["annotations"][ANNOTATION_CLAIM_UID] == "pvc-uid-1"  # type: ignore[union-attr]


def test_stalled_mirrors_failed_for_kstatus() -> None:
    """Flux's kstatus reads ``Stalled=True`` as a failed resource (not InProgress until the timeout)."""
    m = model()
    failing = plan_reconcile(m, observed(m, jobs=[job(m, "failed", failed("GatedRepo"))]), CONFIG).status
    stalled, failed_ = condition(failing, "Stalled"), condition(failing, "Failed")
    assert (stalled["status"], stalled["reason"], stalled["message"]) == ("True", "GatedRepo", failed_["message"])
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW), service=service(m))
    ready = plan_reconcile(m, obs, CONFIG).status
    assert condition(ready, "Stalled")["status"] == "False" and condition(ready, "Ready")["status"] == "True"


def test_an_operator_restart_does_not_hold_a_serving_model_while_it_plans_again() -> None:
    from vllm_operator.memory import plan_digest

    m = model(**GPU)
    known = {"fits": True, "reason": "fits", "source": "operator", "inputsDigest": plan_digest(m)}
    m = model(status={"plan": known}, **GPU)
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW), service=service(m),
                   memory=PLANNING)  # fmt: skip
    plan = plan_reconcile(m, obs, CONFIG)
    assert plan.actions == [] and plan.status["phase"] == "Ready"
    assert condition(plan.status, "MemoryFits")["status"] == "True"
    # Other inputs (a spec change): the old plan does not count; hold until planned again.
    changed = model(status={"plan": known}, maxModelLen=4096, **GPU)
    assert plan_reconcile(changed, observed(changed, pvc=None, memory=PLANNING), CONFIG).actions == []
    assert plan_reconcile(changed, observed(changed, pvc=None, memory=PLANNING), CONFIG).status["phase"] == "Pending"


# --- a finished Job is judged with its pod's termination message -------------------------------------


def finished_without_message(m: VLLMModel, phase: str, finished: datetime.datetime = NOW) -> Any:
    """The Job says Complete/Failed, its pod's status (with the termination message) has not arrived yet."""
    j, pods = job(m, phase, finished=finished)
    pods[0]["status"]["containerStatuses"][0]["state"] = {"running": {}}
    return j, pods


def reconcile_in_order(m: VLLMModel, states: list[Observed]) -> list[Plan]:
    """Plan each observed state in turn, the status of each feeding the next (as the engine writes it)."""
    plans, status = [], dict(m.status)
    for obs in states:
        current = model(status=status, **{k: v for k, v in m.spec.items() if k in ("revision", "hfTokenSecretRef")})
        plans.append(plan_reconcile(current, obs, CONFIG))
        status = plans[-1].status
    return plans


@pytest.mark.parametrize(
    ("phase", "message", "reason"),
    [("failed", failed("GatedRepo"), "GatedRepo"), ("succeeded", ok(NEW), None)],
    ids=["failed", "succeeded"],
)
def test_a_finished_job_waits_for_its_pods_message_in_either_event_order(
    phase: str, message: dict[str, Any], reason: str | None
) -> None:
    m = model()
    running_with_message = job(m, "running", message)  # the pod's message first, then the Job's condition
    finished_first = finished_without_message(m, phase)  # the Job's condition first, then the pod's message
    final = job(m, phase, message)
    pod_first = reconcile_in_order(m, [observed(m, jobs=[running_with_message]), observed(m, jobs=[final])])
    job_first = reconcile_in_order(m, [observed(m, jobs=[finished_first]), observed(m, jobs=[final])])
    waiting = job_first[0]
    assert waiting.status["phase"] == "Caching" and condition(waiting.status, "Failed")["status"] == "False"
    assert transition_events(m, {}, waiting.status) == [], "no Warning that a later read would contradict"
    assert waiting.requeue_after == RESULT_WAIT.total_seconds(), "look again when the wait is over"
    assert pod_first[0].status["phase"] == "Caching", "a running Job may still retry: not judged yet"
    assert pod_first[-1].status == job_first[-1].status, "the same final status in both orders"
    assert pod_first[-1].actions == job_first[-1].actions
    final_failed = condition(job_first[-1].status, "Failed")
    assert final_failed["reason"] == (reason or "NoFailure")
    warnings = [e.reason for p in job_first for e in transition_events(m, {}, p.status) if e.type == "Warning"]
    assert warnings == ([reason] if reason else [])


@pytest.mark.parametrize(
    ("phase", "revision", "reason", "commit"),
    [
        ("failed", "main", "PodFailurePolicy", None),  # the Job's own reason, after the wait
        ("succeeded", "main", "CacheSummaryMissing", None),
        ("succeeded", OLD, None, OLD),  # a 40-hex revision needs no summary to be known
    ],
)
def test_after_the_bounded_wait_a_finished_job_is_judged_alone(
    phase: str, revision: str, reason: str | None, commit: str | None
) -> None:
    m = model(revision=revision)
    within = plan_reconcile(m, observed(m, jobs=[finished_without_message(m, phase, NOW - RESULT_WAIT / 2)]), CONFIG)
    assert within.status["phase"] == "Caching" and condition(within.status, "Failed")["status"] == "False"
    assert within.requeue_after == pytest.approx((RESULT_WAIT / 2).total_seconds())
    late = finished_without_message(m, phase, NOW - RESULT_WAIT - datetime.timedelta(seconds=1))
    after = plan_reconcile(m, observed(m, jobs=[late]), CONFIG)
    assert condition(after.status, "Failed")["reason"] == (reason or "NoFailure")
    assert after.status.get("resolvedRevision") == commit


def test_a_terminated_pod_without_a_summary_is_judged_at_once() -> None:
    """The message is visible (the container terminated) but holds no summary, e.g. OOMKilled: no wait."""
    m = model()
    j, pods = job(m, "failed")
    pods[0]["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    plan = plan_reconcile(m, observed(m, jobs=[(j, pods)]), CONFIG)
    assert condition(plan.status, "Failed")["reason"] == "PodFailurePolicy"


@pytest.mark.parametrize("bad", ["release", "A" * 40, "a" * 39, "a" * 40 + "\n", "", None, 1234])
def test_a_resolved_commit_that_is_not_40_hex_is_never_deployed(bad: Any) -> None:
    m = model()
    summary = {**ok(NEW), "commit": bad}
    plan = plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", summary)]), CONFIG)
    assert not [a for a in plan.actions if isinstance(a, Apply) and a.obj["kind"] == "Deployment"]
    cond = condition(plan.status, "Failed")
    assert cond["reason"] == "InvalidCommit" and "not a 40-hex commit" in cond["message"]
    assert "resolvedRevision" not in plan.status and plan.status["phase"] == "Failed"
    later = job(m, "succeeded", summary, finished=NOW - RETRY_FAILED_CACHE_AFTER * 2)
    assert plan_reconcile(m, observed(m, jobs=[later]), CONFIG).actions == [], "permanent: not re-run"


# --- stuck cache pods ---------------------------------------------------------------------------------


def stuck(m: VLLMModel, *, stale: bool = False, waiting_reason: str | None = None,
          unschedulable_since: datetime.datetime | None = None) -> Any:  # fmt: skip
    j, pods = job(m, "running", stale=stale)
    cs = pods[0]["status"]["containerStatuses"][0]
    if waiting_reason:
        cs["state"] = {"waiting": {"reason": waiting_reason, "message": 'secret "hf" not found'}}
    if unschedulable_since is not None:
        del pods[0]["status"]["containerStatuses"]
        pods[0]["status"]["conditions"] = [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient memory.",
            "lastTransitionTime": st.now_iso(unschedulable_since)}]  # fmt: skip
    return j, pods


LONG_AGO = NOW - datetime.timedelta(minutes=10)


@pytest.mark.parametrize(
    ("kw", "reason", "fix"),
    [
        ({"waiting_reason": "ImagePullBackOff"}, "ImagePullFailed", "spec.image"),
        ({"waiting_reason": "ErrImagePull"}, "ImagePullFailed", "spec.imagePullSecrets"),
        ({"waiting_reason": "CreateContainerConfigError"}, "CreateContainerConfigError", "spec.hfTokenSecretRef"),
        ({"unschedulable_since": LONG_AGO}, "Unschedulable", "spec.nodeSelector"),
    ],
)
def test_a_cache_job_whose_pod_cannot_start_is_failed_and_replaced_once_the_spec_changes(
    kw: dict[str, Any], reason: str, fix: str
) -> None:
    m = model(hfTokenSecretRef={"name": "hf"})
    plan = plan_reconcile(m, observed(m, jobs=[stuck(m, **kw)]), CONFIG)
    cond = condition(plan.status, "Failed")
    assert (cond["status"], cond["reason"]) == ("True", reason) and fix in cond["message"]
    assert plan.actions == [], "the same spec would get stuck again: the Job is left to the kubelet's retries"
    assert [e.type for e in transition_events(m, {}, plan.status)] == ["Warning"]
    fixed = plan_reconcile(m, observed(m, jobs=[stuck(m, stale=True, **kw)]), CONFIG)
    assert fixed.actions == [Delete(kube.JOBS, "ns", builders.cache_job_name(m),
                                    "the spec changed since its pod got stuck")]  # fmt: skip
    # Once deleted, the next reconcile creates the Job of the fixed spec.
    assert kinds(plan_reconcile(m, observed(m), CONFIG).actions) == ["Apply:Job"]


def test_an_unschedulable_cache_pod_gets_a_grace_period() -> None:
    m = model()
    since = NOW - datetime.timedelta(seconds=30)
    plan = plan_reconcile(m, observed(m, jobs=[stuck(m, unschedulable_since=since)]), CONFIG)
    assert condition(plan.status, "Failed")["status"] == "False", "an autoscaler may be adding a node"
    assert plan.requeue_after == pytest.approx(90.0), "looked at again when the grace ends"


def test_time_based_rules_ask_to_look_again() -> None:
    m = model()
    assert plan_reconcile(m, observed(m, jobs=[job(m, "running")]), CONFIG).requeue_after is None
    pending = plan_reconcile(m, observed(m, pvc=pvc("Pending", created=NOW - datetime.timedelta(minutes=1)),
                                         jobs=[job(m, "running")]), CONFIG)  # fmt: skip
    assert pending.requeue_after == pytest.approx(120.0), "PVC bind grace"
    recent = job(m, "failed", failed("HubUnavailable"), finished=NOW - datetime.timedelta(minutes=1))
    retry = plan_reconcile(m, observed(m, jobs=[recent]), CONFIG)
    assert retry.requeue_after == pytest.approx(240.0), "the retry of a transient failure"
    permanent = plan_reconcile(m, observed(m, jobs=[job(m, "failed", failed("GatedRepo"))]), CONFIG)
    assert permanent.requeue_after is None, "nothing changes with time alone"


# --- finished and unwanted cache Jobs -----------------------------------------------------------------


def test_a_served_job_gets_a_ttl_once_the_status_records_it() -> None:
    m = model()
    obs = observed(m, jobs=[job(m, "succeeded", ok(NEW))], deployment=deployment(m, NEW), service=service(m))
    first = plan_reconcile(m, obs, CONFIG)
    assert first.actions == [], "the status does not record the cache yet: the Job is still needed"
    recorded = model(status=first.status)
    plan = plan_reconcile(recorded, obs, CONFIG)
    assert kinds(plan.actions) == ["Apply:Job"]
    applied = plan.actions[0]
    assert isinstance(applied, Apply) and not applied.created
    assert applied.obj["spec"]["ttlSecondsAfterFinished"] == CONFIG.cache_job_ttl_seconds
    assert applied.obj["metadata"]["annotations"] == obs.jobs[applied.obj["metadata"]["name"]]["metadata"]["annotations"]
    assert plan.status == plan_reconcile(recorded, obs, CONFIG).status
    with_ttl = job(m, "succeeded", ok(NEW))
    with_ttl[0]["spec"]["ttlSecondsAfterFinished"] = 3600
    assert plan_reconcile(recorded, observed(m, jobs=[with_ttl], deployment=deployment(m, NEW),
                                             service=service(m)), CONFIG).actions == []  # fmt: skip
    # Once the TTL controller has deleted it, nothing is re-run: the Deployment carries the commit.
    gone = plan_reconcile(recorded, observed(m, deployment=deployment(m, NEW), service=service(m)), CONFIG)
    assert gone.actions == [] and gone.status == plan.status


def test_pinning_the_branch_to_its_served_commit_restarts_nothing() -> None:
    on_main = model()
    pinned = model(revision=NEW, generation=2)
    obs = observed(pinned, jobs=[job(on_main, "succeeded", ok(NEW))], deployment=deployment(on_main, NEW),
                   service=service(on_main))  # fmt: skip
    plan = plan_reconcile(pinned, obs, CONFIG)
    assert kinds(plan.actions) == ["Delete:Job", "Apply:Deployment"], "no new cache Job: the commit is cached"
    applied = plan.actions[1]
    assert isinstance(applied, Apply)
    assert applied.obj["spec"]["template"] == obs.deployment["spec"]["template"], "no pod is replaced"  # type: ignore[index]
    assert applied.obj["metadata"]["annotations"][builders.ANNOTATION_REVISION] == NEW
    assert plan.events == [] and plan.status["resolvedRevision"] == NEW


# --- the image allowlist ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "prefixes", "allowed"),
    [
        ("anything:1", (), True),
        ("ghcr.io/vllm-model-operator/runtime:0.2", ("ghcr.io/vllm-model-operator/",), True),
        ("ghcr.io/vllm-model-operator/runtime:0.2", ("ghcr.io/vllm-model-operator",), True),
        ("ghcr.io/vllm-model-operator.evil/x:1", ("ghcr.io/vllm-model-operator/",), False),
        ("ghcr.io/vllm-model-operator.evil/x:1", ("ghcr.io/vllm-model-operator",), False),
        ("ghcr.io/vllm-model-operatorx/x", ("ghcr.io/vllm-model-operator",), False),
        ("ghcr.io/org/runtime:1", ("ghcr.io/org/runtime",), True),
        ("ghcr.io/org/runtime@sha256:" + "0" * 64, ("ghcr.io/org/runtime",), True),
        ("ghcr.io/org/runtime-evil:1", ("ghcr.io/org/runtime",), False),
        ("reg.local/x", ("reg.local",), True),
        ("reg.local:5000/x", ("reg.local",), False),  # another endpoint of the host
        ("reg.local.evil/x", ("reg.local",), False),
        ("docker.io/library/nginx", ("ghcr.io/a/", "docker.io/library/"), True),
        ("nginx", ("docker.io/library/",), False),  # matched as written, never normalised
    ],
)
def test_image_allowlist_matches_at_a_path_boundary(image: str, prefixes: tuple[str, ...], allowed: bool) -> None:
    from vllm_operator.plan.image_policy import image_allowed

    assert image_allowed(image, prefixes) is allowed


def test_an_image_outside_the_allowlist_creates_nothing() -> None:
    config = Config(allowed_image_registries=("ghcr.io/vllm-model-operator/",))
    m = model(image="ghcr.io/vllm-model-operator.evil/runtime:1")
    plan = plan_reconcile(m, observed(m, pvc=None), config)
    assert plan.actions == [] and plan.events == []
    cond = condition(plan.status, "Failed")
    assert cond["reason"] == "ImageNotAllowed" and plan.status["phase"] == "Failed"
    assert "ghcr.io/vllm-model-operator.evil/runtime:1" in cond["message"]
    assert "ghcr.io/vllm-model-operator/" in cond["message"]
    assert [(e.type, e.reason) for e in transition_events(m, {}, plan.status)] == [("Warning", "ImageNotAllowed")]
    assert condition(plan.status, "Cached")["reason"] == "ImageNotAllowed"
    # With the claim there and a finished Job, still nothing is applied.
    assert plan_reconcile(m, observed(m, jobs=[job(m, "succeeded", ok(NEW))]), config).actions == []
    allowed = model(image="ghcr.io/vllm-model-operator/runtime:1")
    assert kinds(plan_reconcile(allowed, observed(allowed), config).actions) == ["Apply:Job"]
