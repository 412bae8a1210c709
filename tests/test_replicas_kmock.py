"""Scaling out on ReadWriteOnce storage, rollouts with and without a spare GPU, and the disruption budget,
with the real operator against the emulator (issue 12; docs/scaling.md).

The emulator's StatefulSet controller stands in for Kubernetes' (claims from volumeClaimTemplates, pods per
ordinal, the RollingUpdate partition, status); each replica pod's init container reports a summary as
``vllm-runtime cache`` does, with ``downloadedBytes`` 0 when its claim already held the commit (warm).
What it cannot show: real scheduling and volume attachment, and the time a real download takes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from kube_emulator import (
    DEPLOYMENTS,
    HOLD,
    JOBS,
    PDBS,
    PODS,
    PVCS,
    SERVICES,
    STATEFULSETS,
    CacheOutcome,
    KubeEmulator,
    commit_for,
)
from test_operator_kmock import REPO, Cluster, condition, eventually, free_port, operator_on

from vllm_operator.config import Config

pytestmark = [pytest.mark.kmock, pytest.mark.asyncio(loop_scope="module")]

GPU_SHORT = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = Config(reconcile_interval_seconds=600, metrics_port=free_port(), hf_endpoint="http://127.0.0.1:9",
                    surface_failures_after_seconds=2, retry_max_delay_seconds=2)  # fmt: skip
    async with KubeEmulator() as emu, operator_on(emu, config) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(cluster: Cluster) -> None:
    cluster.emu.forget_requests()
    cluster.emu.unschedulable = None


def claims(cluster: Cluster, ns: str) -> dict[str, str]:
    """The namespace's claims by name, with their uids."""
    return {n: cluster.emu.read(PVCS, ns, n)["metadata"]["uid"] for n in cluster.emu.names(PVCS, ns)}  # type: ignore[index]


def replica_pods(cluster: Cluster, ns: str, name: str) -> list[str]:
    return [p for p in cluster.emu.names(PODS, ns) if p.startswith(f"{name}-") and p.removeprefix(f"{name}-").isdigit()]


def init_summary(cluster: Cluster, ns: str, pod: str) -> dict[str, Any]:
    body = cluster.emu.read(PODS, ns, pod)
    assert body is not None
    (init,) = body["status"]["initContainerStatuses"]
    return dict(json.loads(init["state"]["terminated"]["message"]))


def sts(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    body = cluster.emu.read(STATEFULSETS, ns, name)
    assert body is not None
    return body


def at_rest(cluster: Cluster, ns: str, name: str, replicas: int) -> bool:
    s, status = sts(cluster, ns, name), cluster.status(ns, name)
    return bool(status.get("phase") == "Ready" and s["spec"]["replicas"] == replicas
                and status.get("readyReplicas") == replicas and len(replica_pods(cluster, ns, name)) == replicas)  # fmt: skip


async def test_scale_1_4_2_4_on_rwo_keeps_reuses_and_expires_the_replicas_claims(cluster: Cluster) -> None:
    ns, emu = "scale", cluster.emu
    await cluster.create(ns, "m", replicas=1, cache={"sharing": "PerReplica", "deletePolicy": "Delete",
                                                     "scaledDownRetentionSeconds": 600})  # fmt: skip
    await cluster.ready(ns, "m")
    assert emu.names(DEPLOYMENTS, ns) == [] and emu.names(STATEFULSETS, ns) == ["m"]
    assert list(claims(cluster, ns)) == ["cache-m-0"]  # the cache Job filled replica 0's own claim
    assert init_summary(cluster, ns, "m-0")["downloadedBytes"] == 0, "replica 0 starts warm from the Job's fill"
    assert sorted(emu.names(SERVICES, ns)) == ["m", "m-siblings"]
    assert cluster.status(ns, "m")["sharing"] == "PerReplica"
    # The pod and the StatefulSet arrive on separate watches: the count follows the pod's event.
    await eventually(lambda: cluster.status(ns, "m")["replicaCaches"] == {"cached": 1, "caching": 0, "failed": 0},
                     "replica 0's cache counted")  # fmt: skip

    await cluster.patch(ns, "m", {"spec": {"replicas": 4}})
    await eventually(lambda: at_rest(cluster, ns, "m", 4), "4 replicas ready")
    first = claims(cluster, ns)
    assert sorted(first) == [f"cache-m-{i}" for i in range(4)], "a claim per replica"
    assert all(init_summary(cluster, ns, f"m-{i}")["downloadedBytes"] > 0 for i in (1, 2, 3)), "new claims fill"
    await eventually(lambda: cluster.status(ns, "m")["replicaCaches"]["cached"] == 4, "4 replica caches")

    await cluster.patch(ns, "m", {"spec": {"replicas": 2}})
    await eventually(lambda: at_rest(cluster, ns, "m", 2), "2 replicas")
    assert claims(cluster, ns) == first, "the removed replicas' claims are kept"
    await eventually(lambda: [c["name"] for c in cluster.status(ns, "m").get("unusedClaims", [])]
                     == ["cache-m-2", "cache-m-3"], "unused claims in status")  # fmt: skip

    await cluster.patch(ns, "m", {"spec": {"replicas": 4}})
    await eventually(lambda: at_rest(cluster, ns, "m", 4), "4 replicas again")
    assert claims(cluster, ns) == first, "the same claims serve the same ordinals again"
    assert [init_summary(cluster, ns, f"m-{i}")["downloadedBytes"] for i in (2, 3)] == [0, 0], "warm scale-up"
    await eventually(lambda: "unusedClaims" not in cluster.status(ns, "m"), "no unused claims")

    await cluster.patch(ns, "m", {"spec": {"replicas": 2}})
    await eventually(lambda: at_rest(cluster, ns, "m", 2), "2 replicas")
    await cluster.patch(ns, "m", {"spec": {"cache": {"scaledDownRetentionSeconds": 1}}})
    await eventually(lambda: sorted(claims(cluster, ns)) == ["cache-m-0", "cache-m-1"], "expired claims deleted")
    await eventually(lambda: "unusedClaims" not in cluster.status(ns, "m"), "status forgets deleted claims")


async def test_retain_keeps_scaled_down_claims_past_their_time(cluster: Cluster) -> None:
    ns = "retain"
    await cluster.create(ns, "m", replicas=3, cache={"scaledDownRetentionSeconds": 0})  # RWO: PerReplica by default
    await eventually(lambda: at_rest(cluster, ns, "m", 3), "3 replicas")
    await cluster.patch(ns, "m", {"spec": {"replicas": 1}})
    await eventually(lambda: at_rest(cluster, ns, "m", 1), "1 replica")
    await eventually(lambda: len(cluster.status(ns, "m").get("unusedClaims", [])) == 2, "unused claims listed")
    assert sorted(claims(cluster, ns)) == ["cache-m-0", "cache-m-1", "cache-m-2"], "deletePolicy Retain keeps them"
    assert cluster.status(ns, "m")["sharing"] == "PerReplica", "one replica again does not switch back to Shared"


async def test_scaling_a_shared_rwo_model_out_moves_it_to_a_claim_per_replica(cluster: Cluster) -> None:
    ns, emu = "switch", cluster.emu
    await cluster.create(ns, "m")
    await cluster.ready(ns, "m")
    assert emu.names(DEPLOYMENTS, ns) == ["m"] and cluster.status(ns, "m")["sharing"] == "Shared"
    await cluster.patch(ns, "m", {"spec": {"replicas": 3}})
    await eventually(lambda: at_rest(cluster, ns, "m", 3), "3 replicas as a StatefulSet")
    await eventually(lambda: emu.names(DEPLOYMENTS, ns) == [], "the Deployment goes once the StatefulSet serves")
    assert {"SharingChanged", "CacheVolumeChanged"} <= cluster.event_reasons(ns)
    assert "CacheVolumeReplaced" not in cluster.event_reasons(ns), "nothing was deleted by hand"


def _surge_history(cluster: Cluster, ns: str, name: str, seen: list[tuple[int, int, int]]) -> bool:
    s = sts(cluster, ns, name)
    ready = sum(1 for p in replica_pods(cluster, ns, name)
                if any(c.get("type") == "Ready" and c.get("status") == "True"
                       for c in (cluster.emu.read(PODS, ns, p) or {}).get("status", {}).get("conditions", [])))  # fmt: skip
    partition = s["spec"]["updateStrategy"]["rollingUpdate"]["partition"]
    if not seen or seen[-1] != (s["spec"]["replicas"], partition, ready):
        seen.append((s["spec"]["replicas"], partition, ready))
    return False


@pytest.mark.parametrize("strategy", ["Surge", "InPlace"])
async def test_revision_roll_per_replica(cluster: Cluster, strategy: str) -> None:
    ns, name = f"roll-{strategy.lower()}", "m"
    await cluster.create(ns, name, replicas=2, rollout={"strategy": strategy})
    await eventually(lambda: at_rest(cluster, ns, name, 2), "2 replicas")
    await cluster.patch(ns, name, {"spec": {"revision": "v2"}})
    seen: list[tuple[int, int, int]] = []
    new = commit_for(REPO, "v2")

    def done() -> bool:
        _surge_history(cluster, ns, name, seen)
        return at_rest(cluster, ns, name, 2) and cluster.status(ns, name).get("resolvedRevision") == new and all(
            init_summary(cluster, ns, f"{name}-{i}")["commit"] == new for i in range(2))

    await eventually(done, f"{strategy} roll to v2")
    # Each serving replica's claim got the new commit before its pod was replaced (a prefetch Job while it
    # served): the replaced pods' init containers found it there.
    assert [init_summary(cluster, ns, f"{name}-{i}")["downloadedBytes"] for i in range(2)] == [0, 0]
    assert "Prefetching" in cluster.event_reasons(ns)
    if strategy == "Surge":
        assert max(r for r, _, _ in seen) == 3, f"one extra replica during the roll: {seen}"
        assert [p for r, p, _ in seen if r == 3][:1] == [2], "first only the extra ordinal gets the new commit"
        assert min(ready for _, _, ready in seen) >= 2, f"never fewer ready replicas than asked: {seen}"
    else:
        assert max(r for r, _, _ in seen) == 2, f"no extra pod in place: {seen}"
        assert min(ready for _, _, ready in seen) >= 1, f"one pod at a time: {seen}"
    assert sts(cluster, ns, name)["status"]["currentRevision"] == sts(cluster, ns, name)["status"]["updateRevision"]


async def test_a_surge_that_cannot_get_a_gpu_is_reported_with_the_fix(cluster: Cluster) -> None:
    ns, emu = "stuck", cluster.emu
    await cluster.create(ns, "m")
    await cluster.ready(ns, "m")
    emu.unschedulable = GPU_SHORT
    await cluster.patch(ns, "m", {"spec": {"revision": "v3"}})
    await eventually(lambda: condition(cluster.status(ns, "m"), "RolloutBlocked")["status"] == "True", "blocked")
    blocked = condition(cluster.status(ns, "m"), "RolloutBlocked")
    assert blocked["reason"] == "InsufficientGPU"
    assert "nvidia.com/gpu" in blocked["message"] and "spec.rollout.strategy InPlace" in blocked["message"]
    await eventually(lambda: "InsufficientGPU" in cluster.event_reasons(ns), "an Event names the cause")
    assert cluster.status(ns, "m")["message"].startswith("rollout blocked: pod m-g2-surge cannot be scheduled")
    assert condition(cluster.status(ns, "m"), "Ready")["status"] == "True", "the old pod still serves"


async def test_in_place_with_one_replica_says_it_means_downtime(cluster: Cluster) -> None:
    ns = "inplace-one"
    await cluster.create(ns, "m", rollout={"strategy": "InPlace"})
    await cluster.ready(ns, "m")
    cond = condition(cluster.status(ns, "m"), "RolloutBlocked")
    assert cond["status"] == "False" and cond["reason"] == "InPlaceWithOneReplica" and "down" in cond["message"]
    dep = cluster.emu.read(DEPLOYMENTS, ns, "m")
    assert dep is not None and dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}


async def test_two_replicas_get_a_disruption_budget_and_a_spread_which_go_with_one(cluster: Cluster) -> None:
    ns, emu = "pdb", cluster.emu
    await cluster.create(ns, "m", replicas=2)
    await eventually(lambda: at_rest(cluster, ns, "m", 2), "2 replicas")
    pdb = emu.read(PDBS, ns, "m")
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "m"
    spread = sts(cluster, ns, "m")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "kubernetes.io/hostname" and spread[0]["whenUnsatisfiable"] == "ScheduleAnyway"
    await cluster.patch(ns, "m", {"spec": {"replicas": 1}})
    await eventually(lambda: emu.read(PDBS, ns, "m") is None, "no budget for one replica")
    await cluster.patch(ns, "m", {"spec": {"replicas": 3, "podDisruptionBudget": {"maxUnavailable": "50%"}}})
    await eventually(lambda: (emu.read(PDBS, ns, "m") or {}).get("spec", {}).get("maxUnavailable") == "50%",
                     "the budget as the spec overrides it")  # fmt: skip


async def test_a_replica_keeps_serving_while_its_claim_gets_the_new_commit(cluster: Cluster) -> None:
    ns, name, emu = "prefetch", "m", cluster.emu
    await cluster.create(ns, name, replicas=2)
    await eventually(lambda: at_rest(cluster, ns, name, 2), "2 replicas")
    new = commit_for(REPO, "v4")
    emu.outcomes[new] = HOLD  # the prefetch Jobs (they cache the pinned commit) run until released
    try:
        await cluster.patch(ns, name, {"spec": {"revision": "v4"}})
        job = f"{name}-pf1-{new[:8]}"
        await eventually(lambda: emu.read(JOBS, ns, job) is not None, "replica 1's prefetch Job")
        # The surge pod m-2 has the new commit and serves; the operator has seen it (3 cached replicas) and
        # would now replace m-1, but m-1's claim does not hold the new commit yet: it keeps serving the old.
        await eventually(lambda: cluster.status(ns, name)["replicaCaches"]["cached"] == 3, "the surge pod seen")
        assert sts(cluster, ns, name)["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 2
        old_pod = emu.read(PODS, ns, f"{name}-1")
        assert old_pod is not None and old_pod["metadata"]["annotations"]["vllm-operator.io/commit"] != new
        prefetch = emu.read(JOBS, ns, job)
        assert prefetch is not None
        pod = prefetch["spec"]["template"]["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == f"cache-{name}-1"
        assert pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
            "labelSelector"]["matchLabels"] == {"statefulset.kubernetes.io/pod-name": f"{name}-1"}  # fmt: skip
        await emu.finish_job(ns, job, CacheOutcome(commit=new))
        await eventually(lambda: at_rest(cluster, ns, name, 2) and all(
            init_summary(cluster, ns, f"{name}-{i}")["commit"] == new for i in range(2)), "rolled to v4")
        assert init_summary(cluster, ns, f"{name}-1")["downloadedBytes"] == 0, "replaced warm"
    finally:
        emu.outcomes.pop(new, None)


async def test_a_stuck_surge_of_a_statefulset_is_reported_and_in_place_finishes_it(cluster: Cluster) -> None:
    ns, name, emu = "stuck-sts", "m", cluster.emu
    await cluster.create(ns, name, replicas=2)
    await eventually(lambda: at_rest(cluster, ns, name, 2), "2 replicas")
    emu.unschedulable = GPU_SHORT  # no spare GPU: the surge pod m-2 stays Pending
    await cluster.patch(ns, name, {"spec": {"revision": "v5"}})
    await eventually(lambda: condition(cluster.status(ns, name), "RolloutBlocked")["reason"] == "InsufficientGPU",
                     "blocked on the surge pod")  # fmt: skip
    assert "m-2" in condition(cluster.status(ns, name), "RolloutBlocked")["message"]
    assert sts(cluster, ns, name)["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 2, "m-0, m-1 untouched"
    # The fix the condition names: InPlace needs no extra GPU (the GPUs of the replaced pods are reused).
    emu.unschedulable = None
    await cluster.patch(ns, name, {"spec": {"rollout": {"strategy": "InPlace"}}})
    new = commit_for(REPO, "v5")
    await eventually(lambda: at_rest(cluster, ns, name, 2) and all(
        init_summary(cluster, ns, f"{name}-{i}")["commit"] == new for i in range(2)), "rolled in place")
    assert replica_pods(cluster, ns, name) == ["m-0", "m-1"], "the surge pod is gone"
    await eventually(lambda: condition(cluster.status(ns, name), "RolloutBlocked")["status"] == "False", "unblocked")
