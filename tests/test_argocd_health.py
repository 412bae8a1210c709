"""The Argo CD health check for VLLMModel (deploy/argocd), run with a real Lua interpreter (lupa) on status samples
in Argo CD's own test format, plus samples built by the operator's status code path where it exists."""

from __future__ import annotations

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
