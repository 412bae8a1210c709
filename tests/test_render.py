"""``vllm-operator render`` and ``crd``: every object is valid Kubernetes, made by the operator's own builders."""

from __future__ import annotations

import io
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from vllm_operator import builders, cli, crd, render
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
KUBERNETES_VERSIONS = ["1.29.0", "1.32.0", "1.35.0"]
COMMIT = "7ae557604adf67be50417f59c2c2f167def9a775"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rendered_examples() -> list[dict[str, Any]]:
    return [r.obj for r in render.render_paths([str(EXAMPLES)], Config())]


def test_render_prints_every_child_of_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "render", "-f", str(EXAMPLES))
    assert code == 0, err
    documents = [d for d in yaml.safe_load_all(out) if d]
    models = [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds_per_model: dict[str, list[str]] = {}
    for d in documents:
        kinds_per_model.setdefault(d["metadata"]["labels"]["app.kubernetes.io/instance"], []).append(d["kind"])
    assert set(kinds_per_model) == {m["metadata"]["name"] for m in models}
    for m in models:
        has_pvc = not m["spec"]["model"].startswith("pvc://") and "existingClaim" not in m["spec"].get("cache", {})
        scaling = m["spec"].get("autoscaling")
        autoscaler = [] if not scaling else ["HorizontalPodAutoscaler" if scaling.get("engine") == "hpa" else "ScaledObject"]
        pool = ["InferencePool"] if (m["spec"].get("routing") or {}).get("inferencePool") else []
        model = VLLMModel.from_body(m)  # cache.sharing PerReplica: a StatefulSet, its headless Service and policy
        workload = ["StatefulSet", "Service", "Service", "NetworkPolicy"] if model.per_replica else ["Deployment", "Service"]
        budget = ["PodDisruptionBudget"] if model.max_replicas >= 2 else []
        adapters = m["spec"].get("adapters")  # spec.adapters: a cache Job per Hub adapter, and the adapters ConfigMap
        lora = ["Job"] * sum(1 for a in adapters or [] if not a["model"].startswith("pvc://")) + ["ConfigMap"] * (
            adapters is not None)  # fmt: skip
        expected = ["PersistentVolumeClaim"] * has_pvc + ["Job"] + lora + workload + budget + autoscaler + pool
        assert kinds_per_model[m["metadata"]["name"]] == expected
    # Exactly what the builders produce (the same functions the live operator calls).
    assert documents == rendered_examples()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_validate_against_official_schemas(version: str) -> None:
    objects = rendered_examples()
    assert len(objects) >= 30
    # Custom resources (KEDA's ScaledObject, the InferencePool) are not in Kubernetes' schemas: tests/test_autoscaling.py
    # validates them against their own (KEDA's CRD models, the InferencePool's published API).
    custom = {"keda.sh/v1alpha1", "inference.networking.k8s.io/v1"}
    checked = [obj for obj in objects if obj["apiVersion"] not in custom]
    assert any(obj["kind"] == "HorizontalPodAutoscaler" for obj in checked)
    for obj in checked:
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_would_catch_a_mistake() -> None:
    obj = builders.deployment_for(VLLMModel.from_body({"metadata": {"name": "m"}, "spec": {"model": "o/n"}}), Config(), COMMIT)
    obj["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGets"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)


def test_branch_gets_a_marked_placeholder_and_a_commit_is_used_as_is(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(capsys, "render", "-f", str(EXAMPLES / "01-small-hub-model.yaml"))
    placeholder = render.placeholder_commit("main")
    assert f"--revision\n        - {placeholder}" in out.replace("'", "")
    assert "the operator deploys the 40-hex commit the cache Job resolves it to" in out
    _, out, _ = run_cli(capsys, "render", "-f", str(EXAMPLES / "02-pinned-commit.yaml"))
    (dep,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--revision") + 1] == COMMIT
    assert "commit-resolved-from" not in out


def test_owner_references_only_with_a_uid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body: dict[str, Any] = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                            "metadata": {"name": "m", "namespace": "team", "uid": "abc"},
            "spec": {"model": "org/name"}}  # fmt: skip
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(body))
    _, out, _ = run_cli(capsys, "render", "-f", str(tmp_path / "m.yaml"))
    owned = {}
    for d in (d for d in yaml.safe_load_all(out) if d):
        owned[d["kind"]] = [ref["uid"] for ref in d["metadata"].get("ownerReferences", [])]
        assert d["metadata"]["namespace"] == "team"
    # Retain (the default): a GitOps user applying this output must not lose the cache with the model.
    assert owned == {"PersistentVolumeClaim": [], "Job": ["abc"], "Deployment": ["abc"], "Service": ["abc"]}
    body["spec"]["cache"] = {"deletePolicy": "Delete"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(body))
    _, out, _ = run_cli(capsys, "render", "-f", str(tmp_path / "m.yaml"))
    (pvc,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "abc"
    del body["metadata"]["uid"]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(body))
    _, out, _ = run_cli(capsys, "render", "-f", str(tmp_path / "m.yaml"))
    assert "ownerReferences:" not in out.replace("# ownerReferences:", "")


def test_render_reads_multi_document_files_and_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n---\n" + (EXAMPLES / "04-awq.yaml").read_text()
    text += "---\n" + (EXAMPLES / "01-small-hub-model.yaml").read_text()
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, _ = run_cli(capsys, "render", "-f", "-", "--namespace", "ml")
    assert code == 0
    documents = [d for d in yaml.safe_load_all(out) if d]
    assert {d["metadata"]["labels"]["app.kubernetes.io/instance"] for d in documents} == {"qwen-7b-awq", "qwen-small"}
    assert {d["metadata"]["namespace"] for d in documents} == {"ml"}
    assert all(d["kind"] != "Namespace" for d in documents)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("apiVersion: vllm-operator.io/v1alpha1\nkind: VLLMModel\nmetadata: {name: m}\nspec: {model: llama}\n", "spec.model"),
        ("apiVersion: vllm-operator.io/v1alpha1\nkind: VLLMModel\nmetadata: {name: m}\n"
         "spec: {model: o/n, extraArgs: [--port, '1']}\n", "spec.extraArgs"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n", "no VLLMModel"),
        ("a: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_render_errors_name_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, words: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, out, err = run_cli(capsys, "render", "-f", str(path))
    assert code == 1 and out == ""
    assert words in err
    assert "Traceback" not in err


def test_render_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "render", "-f", str(tmp_path / "nope.yaml"))
    assert code == 1 and "no such file" in err
    code, _, err = run_cli(capsys, "render", "-f", str(tmp_path))
    assert code == 1 and "no .yaml" in err


def test_crd_command_prints_the_crd_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "crd")
    assert code == 0
    assert out == (ROOT / "crds" / "vllmmodel.yaml").read_text()


@pytest.mark.parametrize(
    ("argv", "env", "namespaces"),
    [
        (["run"], {}, ()),
        (["run"], {"VLLM_OPERATOR_NAMESPACES": "a,b"}, ("a", "b")),
        (["run", "-n", "x", "--namespace", "y"], {"VLLM_OPERATOR_NAMESPACES": "a"}, ("x", "y")),
        (["run", "--all-namespaces"], {"VLLM_OPERATOR_NAMESPACES": "a"}, ()),
    ],
)
def test_run_calls_the_runner_with_namespaces(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], namespaces: tuple[str, ...]
) -> None:
    calls: list[tuple[Config, tuple[str, ...]]] = []
    fake = types.ModuleType("vllm_operator.runner")
    fake.run = lambda config, ns, **kwargs: calls.append((config, ns))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm_operator.runner", fake)
    monkeypatch.delenv("VLLM_OPERATOR_NAMESPACES", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(argv) == 0
    assert [ns for _, ns in calls] == [namespaces]


def test_console_script_renders_the_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_operator.cli", "render", "-f", str(EXAMPLES)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    workloads = result.stdout.count("\nkind: Deployment\n") + result.stdout.count("\nkind: StatefulSet\n")
    assert workloads == len(list(EXAMPLES.glob("*.yaml")))


# --- render is what the operator applies ---------------------------------------------------------------

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def example_body(path: Path) -> dict[str, Any]:
    (body,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == crd.KIND]
    body["metadata"]["uid"] = "model-uid"  # as `kubectl get -o yaml` gives it
    return dict(body)


def planned_children(body: dict[str, Any], config: Config, commit: str) -> tuple[list[dict[str, Any]], str | None]:
    """Every child the plan applies for ``body``, stepping through a first deployment: the PVC, then
    (the PVC bound) the cache Job, then (the Job done, ``commit`` cached) the Deployment and Service."""
    import datetime
    import json

    from vllm_operator.memory import NO_GPU, OPERATOR, from_summary, plan_digest
    from vllm_operator.plan import Apply, Observed, plan_reconcile

    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    model = VLLMModel.from_body(body)
    memory = NO_GPU
    if model.spec.get("gpu"):
        memory = from_summary({"fits": True, "reason": "fits", "inputsDigest": plan_digest(model)}, OPERATOR)
        body["status"] = {"plan": memory.plan}  # what render reads from a live object
    applied: list[dict[str, Any]] = []

    def step(**observed: Any) -> None:
        plan = plan_reconcile(model, Observed(now=now, memory=memory, **observed), config)
        applied.extend(a.obj for a in plan.actions if isinstance(a, Apply))

    pvc: dict[str, Any] | None = None
    if model.owns_cache_pvc:
        step()
        pvc = {**applied[-1], "status": {"phase": "Bound"}}
        pvc["metadata"] = {**pvc["metadata"], "uid": "pvc-uid"}
    elif model.existing_claim:
        pvc = {"metadata": {"name": model.existing_claim, "uid": "pvc-uid"}, "status": {"phase": "Bound"}}
    step(pvc=pvc)
    jobs, pods = {}, []  # the cache Job, and with spec.adapters each adapter's: all succeed
    for obj in [o for o in applied if o["kind"] == "Job"]:
        job = {**obj, "status": {"succeeded": 1, "completionTime": "2026-12-01T00:00:00Z",
                                 "conditions": [{"type": "Complete", "status": "True"}]}}  # fmt: skip
        summary = {"ok": True, "command": "cache", "commit": commit, "bytes": 1, "files": 1, "verified": True}
        pods.append({"metadata": {"name": f"p{len(pods)}", "labels": {"job-name": job["metadata"]["name"]}},
                     "status": {"containerStatuses": [{"name": "cache", "state": {"terminated": {
                         "exitCode": 0, "message": json.dumps(summary)}}}]}})  # fmt: skip
        jobs[job["metadata"]["name"]] = job
    step(pvc=pvc, jobs=jobs, pods=pods)
    if model.spec.get("adapters"):  # render reads the adapters' commits from status.adapters, as recorded
        body.setdefault("status", {})["adapters"] = [
            {"name": a["name"], "model": a["model"], "revision": a.get("revision", "main"), "commit": commit}
            for a in model.spec["adapters"]]  # fmt: skip
    latest: dict[tuple[str, str], dict[str, Any]] = {}  # an object applied again (the adapters ConfigMap): its last
    for obj in applied:
        latest[(obj["kind"], obj["metadata"]["name"])] = obj
    return list(latest.values()), "pvc-uid" if pvc is not None else None


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_render_prints_exactly_what_the_plan_applies(path: Path) -> None:
    body = example_body(path)
    revision = str((body.get("spec") or {}).get("revision") or "main")
    commit = revision if len(revision) == 40 else COMMIT
    config = Config()
    applied, claim_uid = planned_children(body, config, commit)
    rendered = [r.obj for r in render.render_model(body, config, commit=commit, claim_uid=claim_uid)]
    assert [o["kind"] for o in applied] == [o["kind"] for o in rendered]
    for plan_obj, render_obj in zip(applied, rendered, strict=True):
        assert plan_obj == render_obj, f"{path.name}: {plan_obj['kind']} differs"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_container_of_every_example_has_a_read_only_root(path: Path) -> None:
    pods = [r.obj["spec"]["template"]["spec"] for r in render.render_model(example_body(path), Config())
            if r.obj["kind"] in ("Deployment", "StatefulSet", "Job")]  # fmt: skip
    hub_adapters = [a for a in example_body(path)["spec"].get("adapters") or [] if not a["model"].startswith("pvc://")]
    assert len(pods) == 2 + len(hub_adapters)  # the cache Job (one more per Hub adapter) and the model pods
    for pod in pods:
        containers = pod.get("initContainers", []) + pod["containers"]
        assert containers
        for c in containers:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{path.name}: {c['name']}"
