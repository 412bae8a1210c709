"""``vllm-operator render`` is exactly what the live operator applies: every example, field by field.

Each example is created in the emulator (its own namespace) and reconciled by the real operator until
it is Ready; then ``render`` is given what only the cluster knew (the model's uid and status, the
resolved commit, the cache PVC's uid) and must produce each applied child exactly: same objects, same
fields, same values -- ownerReferences and annotations included. Server-owned fields (uid,
resourceVersion, creationTimestamp, generation, status) are the only ones set aside.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml
from kube_emulator import (
    CONFIGMAPS,
    DEPLOYMENTS,
    HPAS,
    INFERENCEPOOLS,
    JOBS,
    NETWORKPOLICIES,
    PDBS,
    PVCS,
    SCALEDOBJECTS,
    SERVICES,
    STATEFULSETS,
    CacheOutcome,
    KubeEmulator,
)
from test_operator_kmock import Cluster, Operator, eventually, free_port

from vllm_operator import render
from vllm_operator.config import Config

pytestmark = [pytest.mark.kmock, pytest.mark.asyncio(loop_scope="module")]

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")
PLANNED = {"fits": True, "reason": "fits", "maxModelLen": 4096, "modelBytes": 5 * 2**20}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    # The examples' models are not on any Hub here: the operator cannot plan, so cache Jobs plan (and fit).
    emu = KubeEmulator()
    emu.outcomes.update({rev: CacheOutcome(plan=PLANNED) for rev in _revisions()})
    async with emu, kmock.Server(emu) as server:
        config = Config(reconcile_interval_seconds=600, metrics_port=free_port(), hf_endpoint="http://127.0.0.1:9")
        operator = Operator(config, str(server.url).rstrip("/"))
        await operator.start()
        try:
            yield Cluster(emu, operator)
        finally:
            await operator.stop()


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and render.is_vllm_model(d)]


def _revisions() -> set[str]:
    return {str((d.get("spec") or {}).get("revision", "main")) for p in EXAMPLES for d in _documents(p)}


def _server_side_removed(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    for field in SERVER_FIELDS:
        obj["metadata"].pop(field, None)
    return obj


def _differences(rendered: Any, applied: Any, path: str = "") -> list[str]:
    if isinstance(rendered, dict) and isinstance(applied, dict):
        return [d for k in sorted(set(rendered) | set(applied), key=str)
                for d in _differences(rendered.get(k), applied.get(k), f"{path}.{k}")]  # fmt: skip
    if isinstance(rendered, list) and isinstance(applied, list) and len(rendered) == len(applied):
        return [d for i, (r, a) in enumerate(zip(rendered, applied, strict=True))
                for d in _differences(r, a, f"{path}[{i}]")]  # fmt: skip
    return [] if rendered == applied else [f"{path}: render {rendered!r} != applied {applied!r}"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
async def test_render_equals_what_the_operator_applies(cluster: Cluster, example: Path) -> None:
    ns, emu = example.stem.lower().replace("_", "-")[:40], cluster.emu
    for document in _documents(example):
        name = document["metadata"]["name"]
        claim = ((document["spec"].get("cache") or {}).get("existingClaim")
                 or str(document["spec"]["model"]).removeprefix("pvc://").split("/")[0]
                 if str(document["spec"]["model"]).startswith("pvc://") or (document["spec"].get("cache") or {}).get("existingClaim")
                 else None)  # fmt: skip
        if claim:  # the user's volume, as the example expects it to exist
            await emu.put(PVCS, ns, claim, {"spec": {"accessModes": ["ReadOnlyMany"]}, "status": {"phase": "Bound"}})
        await cluster.create(ns, name, **{k: v for k, v in document["spec"].items() if k != "model"},
                             model=document["spec"]["model"])  # fmt: skip
        await eventually(lambda: cluster.status(ns, name).get("phase") == "Ready", f"{ns}/{name} Ready", timeout=30)
        body = cluster.model(ns, name)
        pvc_name = body["status"]["cache"].get("claimName")
        pvc = emu.read(PVCS, ns, pvc_name) if pvc_name else None
        rendered = render.render_model(body, cluster.operator.config, namespace=ns,
                                       commit=body["status"]["resolvedRevision"],
                                       claim_uid=pvc["metadata"]["uid"] if pvc else None, served=True)  # fmt: skip
        by_kind = {(r.obj["kind"], r.obj["metadata"]["name"]): r.obj for r in rendered}
        if pvc is not None:
            # A claim is sized once, when created, and never shrunk: before the cache existed (and, when the
            # cache Job made the plan, before the plan): render it from the model as the operator saw it then.
            before = {k: v for k, v in body["status"].items()
                      if k != "cache" and (k != "plan" or v.get("source") == "operator")}  # fmt: skip
            for r in render.render_model({**body, "status": before}, cluster.operator.config, namespace=ns,
                                         commit=body["status"]["resolvedRevision"]):  # fmt: skip
                if r.obj["kind"] == "PersistentVolumeClaim":
                    by_kind[("PersistentVolumeClaim", r.obj["metadata"]["name"])] = r.obj
                    # cache.sharing PerReplica: every replica's claim is sized as replica 0's was, when it was made.
                    statefulset = by_kind.get(("StatefulSet", name))
                    if statefulset is not None:
                        statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"] = r.obj["spec"]["resources"]
        applied = {}
        for resource, kind in ((PVCS, "PersistentVolumeClaim"), (JOBS, "Job"), (DEPLOYMENTS, "Deployment"),
                               (SERVICES, "Service"), (SCALEDOBJECTS, "ScaledObject"),
                               (HPAS, "HorizontalPodAutoscaler"), (INFERENCEPOOLS, "InferencePool"),
                               (STATEFULSETS, "StatefulSet"), (PDBS, "PodDisruptionBudget"),
                               (NETWORKPOLICIES, "NetworkPolicy"), (CONFIGMAPS, "ConfigMap")):  # fmt: skip
            for child in emu.names(resource, ns):
                obj = emu.read(resource, ns, child)
                assert obj is not None
                if resource == PVCS and child.startswith(f"cache-{name}-") and child != f"cache-{name}-0":
                    continue  # made by the StatefulSet controller from the rendered StatefulSet's claim template
                if (obj["metadata"].get("labels") or {}).get("vllm-operator.io/model") == name:
                    applied[(kind, child)] = _server_side_removed(obj)
        assert set(by_kind) == set(applied), "render and the operator make the same objects"
        for key, obj in applied.items():
            assert _differences(by_kind[key], obj) == [], f"{key} differs"
