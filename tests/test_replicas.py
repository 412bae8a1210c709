"""The scale-out builders and plan pieces on their own (issue 12; docs/scaling.md): which sharing a spec gets,
the StatefulSet with a claim per replica, its init container and the runtime's flags, the sibling port's
NetworkPolicy, the disruption budget and spread, the replica caches' counts, unused claims and blocked rollouts.
The emulator tests (test_replicas_kmock.py) run the same through the real operator."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from vllm_operator import builders, replicas
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_operator.plan import Delete, Observed
from vllm_operator.plan import replicas_step as step
from vllm_runtime import cli as runtime_cli

COMMIT = "7ae557604adf67be50417f59c2c2f167def9a775"
NOW = datetime.datetime(2026, 12, 2, 8, 0, tzinfo=datetime.timezone.utc)


def make(name: str = "m", status: dict[str, Any] | None = None, **spec: Any) -> VLLMModel:
    return VLLMModel.from_body({"metadata": {"name": name, "namespace": "ns", "uid": "u1"},
                                "spec": {"model": "org/name", **spec}, "status": status or {}})  # fmt: skip


@pytest.mark.parametrize(("spec", "status", "sharing"), [
    ({}, {}, "Shared"),  # one replica: as before, a Deployment on one claim
    ({"replicas": 4}, {}, "PerReplica"),  # ReadWriteOnce and more than one replica
    ({"autoscaling": {"maxReplicas": 3}}, {}, "PerReplica"),  # the autoscaler may go there
    ({"replicas": 4, "cache": {"accessModes": ["ReadWriteMany"]}}, {}, "Shared"),
    ({"replicas": 2, "cache": {"existingClaim": "c"}}, {}, "Shared"),
    ({"model": "pvc://store/m", "replicas": 2}, {}, "Shared"),
    ({"cache": {"sharing": "PerReplica"}}, {}, "PerReplica"),
    ({"replicas": 1}, {"sharing": "PerReplica"}, "PerReplica"),  # scaled back to one: it stays
    ({"replicas": 4, "cache": {"sharing": "Shared", "accessModes": ["ReadWriteMany"]}}, {"sharing": "PerReplica"}, "Shared"),
])  # fmt: skip
def test_sharing_default(spec: dict[str, Any], status: dict[str, Any], sharing: str) -> None:
    assert make(status=status, **spec).sharing == sharing


def test_statefulset_gives_each_replica_its_own_claim_and_fills_it_before_vllm() -> None:
    model = make(replicas=4, hfTokenSecretRef={"name": "hf"}, cache={"deletePolicy": "Delete"}, gpu={"type": "L4"})
    sts = builders.workload_for(model, Config(), COMMIT, claim_uid="c0")
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 4
    spec = sts["spec"]
    assert spec["serviceName"] == "m-siblings" and spec["podManagementPolicy"] == "Parallel"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Retain"}
    (template,) = spec["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "cache" and template["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]["spec"]
    assert "cache" not in [v["name"] for v in pod["volumes"]], "the claim template provides the cache volume"
    (init,) = pod["initContainers"]
    args = init["args"]
    assert args[:1] == ["cache"] and args[args.index("--revision") + 1] == COMMIT, "exactly the pinned commit"
    assert args[args.index("--sibling") + 1] == "http://m-siblings.ns.svc:8090"
    assert not [a for a in args if a.startswith("--plan-")], "the memory plan is the cache Job's alone"
    (server,) = pod["containers"]
    assert server["args"][server["args"].index("--sibling-port") + 1] == "8090"
    assert {"name": "sibling", "containerPort": 8090, "protocol": "TCP"} in server["ports"]
    # The token reaches only the init container (metadata from the Hub), never the serving container.
    assert any(e["name"] == "HF_TOKEN" and "valueFrom" in e for e in init["env"])
    assert not any(e["name"] == "HF_TOKEN" for e in server["env"])
    # Replica 0's claim is the one the cache Job fills; the StatefulSet will use the claim of that name.
    claim = builders.cache_pvc_for(model, Config())
    assert claim is not None and claim["metadata"]["name"] == replicas.replica_claim_name(model, 0) == "cache-m-0"
    assert claim["metadata"]["labels"] == template["metadata"]["labels"]
    job = builders.cache_job_for(model, Config())
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "cache-m-0"}} in job["spec"]["template"]["spec"]["volumes"]


def test_the_runtime_takes_the_flags_the_operator_gives() -> None:
    sts = builders.workload_for(make(replicas=2), Config(), COMMIT)
    parser = runtime_cli.build_parser()
    init = sts["spec"]["template"]["spec"]["initContainers"][0]
    parsed = parser.parse_args(init["args"])
    assert parsed.sibling == ["http://m-siblings.ns.svc:8090"] and parsed.revision == COMMIT
    server = sts["spec"]["template"]["spec"]["containers"][0]
    assert parser.parse_args(server["args"]).sibling_port == 8090


def _allowed(policy: dict[str, Any], source_labels: dict[str, str], port: int | str) -> bool:
    """Whether ``policy`` lets a pod of ``source_labels`` (same namespace) reach ``port`` of the pods it selects:
    NetworkPolicy ingress semantics (a rule without ``from`` admits every source; ports by number or name)."""
    names = {"http": builders.HTTP_PORT, "metrics": builders.RUNTIME_METRICS_PORT, "sibling": replicas.SIBLING_PORT}
    number = names.get(str(port), port)
    for rule in policy["spec"]["ingress"]:
        ports = [names.get(str(p["port"]), p["port"]) for p in rule.get("ports") or []]
        if ports and number not in ports:
            continue
        sources = rule.get("from")
        if sources is None or any(
            set(s["podSelector"]["matchLabels"].items()) <= set(source_labels.items()) for s in sources if "podSelector" in s
        ):
            return True
    return False


def test_network_policy_allows_exactly_the_sibling_port_from_the_same_models_pods() -> None:
    model = make(replicas=2)
    policy = replicas.network_policy_for(model)
    assert policy["spec"]["podSelector"]["matchLabels"] == builders.selector_for(model)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    same = builders.labels_for(model, builders.COMPONENT_SERVER)
    other_model = builders.labels_for(make("other"), builders.COMPONENT_SERVER)
    cache_job = builders.labels_for(model, builders.COMPONENT_CACHE)
    assert _allowed(policy, same, replicas.SIBLING_PORT)
    assert not _allowed(policy, other_model, replicas.SIBLING_PORT)
    assert not _allowed(policy, {"app": "anything"}, replicas.SIBLING_PORT)
    assert not _allowed(policy, cache_job, replicas.SIBLING_PORT), "only serving replicas, not the cache Job"
    assert not _allowed(policy, same, 12345), "nothing else is opened"
    # The API and metrics stay reachable as without the policy (it isolates every port it does not list).
    assert _allowed(policy, {"app": "client"}, "http") and _allowed(policy, {"app": "prometheus"}, "metrics")


def test_disruption_budget_and_spread_follow_the_replicas_and_the_spec() -> None:
    one, two = make(), make(replicas=2, cache={"accessModes": ["ReadWriteMany"]})
    assert not replicas.wants_disruption_budget(one) and replicas.wants_disruption_budget(two)
    assert replicas.disruption_budget_for(two)["spec"]["maxUnavailable"] == 1
    assert replicas.wants_disruption_budget(make(autoscaling={"maxReplicas": 4, "minReplicas": 1}))
    assert not replicas.wants_disruption_budget(make(replicas=2, podDisruptionBudget={"enabled": False}))
    dep = builders.deployment_for(two, Config(), COMMIT)
    assert dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert "topologySpreadConstraints" not in builders.deployment_for(one, Config(), COMMIT)["spec"]["template"]["spec"]
    off = builders.deployment_for(make(replicas=2, cache={"accessModes": ["ReadWriteMany"]}, topologySpreadConstraints=[]),
                                  Config(), COMMIT)  # fmt: skip
    assert off["spec"]["template"]["spec"]["topologySpreadConstraints"] == []
    assert builders.deployment_for(make(rollout={"strategy": "InPlace"}), Config(), COMMIT)["spec"]["strategy"][
        "rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}  # fmt: skip


def _pod(name: str, init_state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"name": "cache", "state": init_state}
    if last is not None:
        status["lastState"] = last
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": "server"}},
            "status": {"initContainerStatuses": [status]}}  # fmt: skip


def _terminated(code: int, summary: dict[str, Any]) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "message": json.dumps(summary)}}


def test_replica_caches_are_counted_from_the_init_containers_and_a_failure_is_named() -> None:
    model = make(replicas=4)
    ok = {"ok": True, "command": "cache", "commit": COMMIT, "hubBytes": 10, "siblingBytes": 990}
    bad = {"ok": False, "command": "cache", "reason": "InsufficientSpace", "message": "need 9 GiB, 2 GiB free"}
    pods = [_pod("m-0", _terminated(0, ok)), _pod("m-1", {"running": {}}), _pod("m-2", {"waiting": {}}),
            _pod("m-3", {"waiting": {"reason": "CrashLoopBackOff"}}, last=_terminated(3, bad)),
            {"metadata": {"name": "m-cache-x-pod", "labels": {"app.kubernetes.io/component": "cache"}}}]  # fmt: skip
    result = step.plan_replicas(model, Observed(now=NOW, pods=pods), Config(), wanted=False, rolled_out=False)
    assert result.replica_caches == {"cached": 1, "caching": 2, "failed": 1, "hubBytes": 10, "siblingBytes": 990}
    (failure,) = result.failures
    assert failure.reason == "InsufficientSpace" and "replica m-3" in failure.message and "spec.cache.size" in failure.message


def _claim(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": name}}


def test_unused_claims_are_dated_kept_and_deleted_when_expired() -> None:
    claims = {n: _claim(n) for n in ("cache-m-0", "cache-m-1", "cache-m-2", "cache-m-3", "other-claim")}
    earlier = (NOW - datetime.timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    model = make(replicas=2, cache={"deletePolicy": "Delete", "scaledDownRetentionSeconds": 60},
                 status={"unusedClaims": [{"name": "cache-m-3", "since": earlier}]})  # fmt: skip
    result = step.plan_replicas(model, Observed(now=NOW, claims=claims), Config(), wanted=False, rolled_out=False)
    assert result.unused_claims == [{"name": "cache-m-2", "since": "2026-12-02T08:00:00Z"}]
    assert [(a.resource.plural, a.name) for a in result.actions if isinstance(a, Delete)] == [
        ("persistentvolumeclaims", "cache-m-3")]  # fmt: skip
    assert result.requeue_after == 60, "looked at again when the next one expires"
    kept = make(replicas=2, cache={"scaledDownRetentionSeconds": 60},
                status={"unusedClaims": [{"name": "cache-m-3", "since": earlier}]})  # Retain (the default)
    result = step.plan_replicas(kept, Observed(now=NOW, claims=claims), Config(), wanted=False, rolled_out=False)
    assert not result.actions and [c["name"] for c in result.unused_claims or []] == ["cache-m-2", "cache-m-3"]
    scaled_to_zero = make(replicas=0, cache={"deletePolicy": "Delete", "scaledDownRetentionSeconds": 0,
                                             "sharing": "PerReplica"})  # fmt: skip
    result = step.plan_replicas(scaled_to_zero, Observed(now=NOW, claims=claims), Config(), wanted=False, rolled_out=False)
    assert "cache-m-0" not in [a.name for a in result.actions if isinstance(a, Delete)], "replica 0's claim stays"


@pytest.mark.parametrize(("message", "reason", "fix"), [
    ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", "InsufficientGPU", "spec.rollout.strategy InPlace"),
    ("0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.", "NoMatchingNode",
     "spec.nodeSelector"),
    ("0/3 nodes are available: 3 Insufficient memory.", "Unschedulable", "spec.resources"),
])  # fmt: skip
def test_a_pod_unschedulable_for_30s_blocks_the_rollout_with_its_cause(message: str, reason: str, fix: str) -> None:
    def pending(seconds: int) -> dict[str, Any]:
        since = (NOW - datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"metadata": {"name": "m-new", "labels": {"app.kubernetes.io/component": "server"}},
                "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                           "message": message, "lastTransitionTime": since}]}}  # fmt: skip

    model = make()
    early = step.plan_replicas(model, Observed(now=NOW, pods=[pending(10)]), Config(), wanted=False, rolled_out=False)
    assert early.condition.status == "False" and early.requeue_after == 20, "looked at again when the grace ends"
    late = step.plan_replicas(model, Observed(now=NOW, pods=[pending(31)]), Config(), wanted=False, rolled_out=False)
    assert late.condition.status == "True" and late.condition.reason == reason and fix in late.condition.message
    events = step.transition_events({"conditions": []}, {"conditions": [
        {"type": "RolloutBlocked", "status": "True", "reason": reason, "message": late.condition.message}]})  # fmt: skip
    assert [(e.type, e.reason) for e in events] == [("Warning", reason)]


@pytest.mark.parametrize("version", ["1.29.0", "1.32.0", "1.35.0"])
def test_objects_render_does_not_print_are_valid_kubernetes_too(version: str) -> None:
    """The prefetch Job and a StatefulSet mid-roll (extra ordinal, partition) exist only in a cluster."""
    import kubernetes_validate

    model = make(replicas=3, affinity={"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}})
    for obj in (replicas.prefetch_job_for(model, Config(), COMMIT, 2),
                replicas.statefulset_for(model, Config(), COMMIT, replicas=4, partition=3, claim_size="80Gi")):  # fmt: skip
        kubernetes_validate.validate(obj, version, strict=True)
    job = replicas.prefetch_job_for(model, Config(), COMMIT, 2)
    assert len(job["metadata"]["name"]) <= 63 and job["spec"]["ttlSecondsAfterFinished"] == Config().cache_job_ttl_seconds
    assert builders.ANNOTATION_PLAN_DIGEST not in job["metadata"]["annotations"]
