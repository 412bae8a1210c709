"""The Argo CD health check for VLLMModel (deploy/argocd), run with a real Lua interpreter (lupa) on status samples
in Argo CD's own test format, plus samples built by the operator's status code path where it exists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_render import ROOT

lupa = pytest.importorskip("lupa", reason="lupa is in the test extras")

ARGOCD = ROOT / "deploy" / "argocd"
CHECK_DIR = ARGOCD / "resource_customizations" / "vllm-operator.io" / "VLLMModel"
HEALTH_LUA = (CHECK_DIR / "health.lua").read_text()
CASES = yaml.safe_load((CHECK_DIR / "health_test.yaml").read_text())["tests"]


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run health.lua the way Argo CD does: the object as the global `obj`, the returned table is the health."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(HEALTH_LUA)
    return {str(key): str(value) for key, value in result.items()}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_check_cases(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text())
    assert health(obj) == case["healthStatus"]


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_samples_are_valid_vllmmodels(case: dict[str, Any]) -> None:
    """The samples follow the CRD (schema and CEL rules), so the check reads fields the operator really writes."""
    import cel_eval

    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text())
    assert cel_eval.validate(obj) == []


def test_stale_status_is_progressing_whatever_it_says() -> None:
    obj = yaml.safe_load((CHECK_DIR / "testdata" / "ready.yaml").read_text())
    assert health(obj)["status"] == "Healthy"
    obj["metadata"]["generation"] = 3  # the spec changed; the operator has not caught up
    assert health(obj)["status"] == "Progressing"
    obj["status"]["observedGeneration"] = 3  # caught up, but its conditions still describe generation 2
    assert health(obj)["status"] == "Progressing"


def test_argocd_cm_patch_embeds_the_same_lua() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.vllm-operator.io_VLLMModel"] == HEALTH_LUA


def test_health_of_the_statuses_the_operator_writes() -> None:
    """The check reads the statuses the operator's own planner produces (reconcile.plan_reconcile), not only
    hand-written samples: a fresh model, a running cache, a cache that failed for good, a model that serves."""
    from test_reconcile import CONFIG, NEW, deployment, failed, job, model, observed, ok, service

    from vllm_operator.reconcile import plan_reconcile

    def health_of(obs_kwargs: Callable[[Any], dict[str, Any]]) -> dict[str, str]:
        m = model(generation=3)
        plan = plan_reconcile(m, observed(m, **obs_kwargs(m)), CONFIG)
        return health({"metadata": {"name": m.name, "generation": 3}, "status": plan.status})

    assert health_of(lambda m: {"pvc": None})["status"] == "Progressing"
    assert health_of(lambda m: {"jobs": [job(m, "running")]})["status"] == "Progressing"
    gated = health_of(lambda m: {"jobs": [job(m, "failed", failed("GatedRepo"))]})
    assert gated["status"] == "Degraded" and "spec.hfTokenSecretRef" in gated["message"]
    serving = health_of(lambda m: {"jobs": [job(m, "succeeded", ok(NEW))], "deployment": deployment(m, NEW),
                                   "service": service(m)})  # fmt: skip
    assert serving["status"] == "Healthy" and NEW in serving["message"]
    loading = health_of(lambda m: {"jobs": [job(m, "succeeded", ok(NEW))], "deployment": deployment(m, NEW, ready=0),
                                   "service": service(m)})  # fmt: skip
    assert loading["status"] == "Progressing"
