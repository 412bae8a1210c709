"""The Helm chart, rendered offline with several value sets: lint, official schemas, checkov, yamllint, and the
contracts it shares with the operator (CRD copy, env vars, RBAC, monitor selectors)."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_render import CHART, NAMESPACE, RELEASE, ROOT, VALUE_SETS, by_kind, chart_crds, one, render, render_objects

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extras")

KUBERNETES_VERSIONS = ["1.29.0", "1.32.0", "1.35.0", "1.37.0"]
# prometheus-operator's kinds are CRDs, not in the official Kubernetes schemas that kubernetes-validate ships:
# they are validated against prometheus-operator's own types below (and the rules by promtool, test_alerts.py).
NOT_IN_OFFICIAL_SCHEMAS = {"monitoring.coreos.com/v1"}
# Variables the chart sets from dedicated values, not from `config`.
CHART_MANAGED_CONFIG = {"runtime_image", "namespaces", "metrics_port", "allowed_image_registries"}
# checkov checks skipped on the rendered chart, each with the reason it does not apply.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "image digests are optional (image.digest); the default is the immutable appVersion tag",
    "CKV_K8S_15": "pullPolicy is a value; IfNotPresent is right for immutable tags and digests",
    "CKV_K8S_38": "the operator talks to the API server: it needs its service account token",
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_objects(VALUE_SETS[request.param])


def test_chart_lints_clean_with_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (name, problems, report["errors"])


def test_every_rendered_object_validates_against_official_schemas(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    name, objects = rendered
    checked = 0
    for obj in objects:
        if obj["apiVersion"] in NOT_IN_OFFICIAL_SCHEMAS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} on {version}: {error.message}")
        checked += 1
    assert checked >= 5  # Deployment, Service, NetworkPolicy, RBAC at least


def test_prometheus_operator_objects_validate_against_their_own_types(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """Typed models generated from prometheus-operator's CRDs: types and patterns checked, and nothing dropped
    (a field the CRD does not know would vanish in the round trip, as the API server would prune it)."""
    models = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    name, objects = rendered
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            model = getattr(models, obj["kind"]).model_validate(obj)
            dumped = model.model_dump(by_alias=True, exclude_none=True, mode="json")
            assert _contained(obj, dumped), f"{name}: {obj['kind']} has fields its CRD does not know"


def _contained(given: Any, dumped: Any) -> bool:
    """Every value in `given` is in `dumped` (which may add defaults)."""
    if isinstance(given, dict):
        return isinstance(dumped, dict) and all(k in dumped and _contained(v, dumped[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(dumped, list) and len(given) == len(dumped) and all(map(_contained, given, dumped))
    return bool(given == dumped)


def test_crd_in_chart_is_identical_to_crds_dir() -> None:
    sources = sorted((ROOT / "crds").glob("*.yaml"))
    assert sources, "crds/ holds the CRD"
    copies = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in copies] == [p.name for p in sources], "run scripts/sync-crd.sh"
    for source, copy in zip(sources, copies, strict=True):
        assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: run scripts/sync-crd.sh"
    subprocess.run(["bash", str(ROOT / "scripts" / "sync-crd.sh"), "--check"], check=True, capture_output=True)


def test_chart_crd_is_a_valid_crd_with_status_and_scale() -> None:
    import kubernetes_validate

    crds = chart_crds()
    assert [c["metadata"]["name"] for c in crds] == ["vllmmodels.vllm-operator.io"]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(crds[0], version, strict=True)
    (served,) = [v for v in crds[0]["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert served["subresources"]["status"] == {}
    assert served["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_operator_deployment_is_one_recreated_restricted_pod_with_probes() -> None:
    deployment = one(render_objects(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports, probe
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in container["args"]
    # The operator's own command line accepts the chart's arguments.
    from vllm_operator.cli import build_parser

    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "run" and parsed.liveness.endswith(f":{ports['health']}/healthz")
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    # Pod Security Standards "restricted".
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["runAsNonRoot"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and security["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsUser"] != 0


def test_values_become_the_operator_config() -> None:
    from vllm_operator.config import Config

    values = VALUE_SETS["pinned"]
    deployment = one(render_objects(values), "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    environ = {e["name"]: e["value"] for e in env if "value" in e}
    config = Config.from_env(environ)
    assert config.hf_endpoint == "https://hf-mirror.example"
    assert config.startup_timeout_seconds == 7200 and config.cache_size_headroom == 2.5
    assert config.gpu_resource is None  # "" means: request no GPU resource
    assert config.default_storage_class == "fast-rwx"
    assert config.runtime_image == "registry.example/vllm-runtime:v9"
    assert config.namespaces == ()
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@sha256:" + "a" * 64)

    namespaced = one(render_objects(VALUE_SETS["namespaced"]), "Deployment")
    env = namespaced["spec"]["template"]["spec"]["containers"][0]["env"]
    assert Config.from_env({e["name"]: e["value"] for e in env}).namespaces == ("team-a", "team-b")


def test_allowed_image_registries_reach_the_operator() -> None:
    """The allowlist of spec.image prefixes (docs/security.md) goes to the operator's Config as given."""
    from vllm_operator.config import Config

    def environ(values: dict[str, Any]) -> dict[str, str]:
        env = one(render_objects(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
        return {e["name"]: e["value"] for e in env if "value" in e}

    registries = ["ghcr.io/vllm-model-operator/", "registry.internal:5000/ml/models/"]
    rendered = environ({"allowedImageRegistries": registries})
    assert rendered["VLLM_OPERATOR_ALLOWED_IMAGE_REGISTRIES"] == ",".join(registries)
    assert Config.from_env(rendered).allowed_image_registries == tuple(registries)
    # Off by default: any image (the chart says so in values.yaml and docs/security.md).
    assert Config.from_env(environ({})).allowed_image_registries == ()


def test_values_schema_offers_every_operator_setting() -> None:
    from vllm_operator.config import Config

    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = {_snake(key) for key in schema["properties"]["config"]["properties"]}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert offered == fields - CHART_MANAGED_CONFIG, "values.schema.json `config` and Config disagree"
    # Every offered key renders to the variable Config reads.
    values = {"config": {key: _example(prop) for key, prop in schema["properties"]["config"]["properties"].items()}}
    env = one(render_objects(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    names = {e["name"] for e in env}
    assert {f"VLLM_OPERATOR_{field.upper()}" for field in fields} <= names


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"config": {"hfEndpoit": "https://x"}}, "hfEndpoit"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"prometheusRule": {"notReadyFor": "15 minutes"}}, "notReadyFor"),
        ({"config": {"startupTimeoutSeconds": "soon"}}, "startupTimeoutSeconds"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"extraEnv": [{"name": "VLLM_OPERATOR_NAMESPACES", "value": "x"}]}, "extraEnv"),
        ({"replicaCount": 2}, "replicaCount"),
        # A prefix without its closing "/" would also admit ghcr.io/acme-evil/...; a comma would split it.
        ({"allowedImageRegistries": ["ghcr.io/acme"]}, "allowedImageRegistries"),
        ({"allowedImageRegistries": ["ghcr.io/a/,evil.example/"]}, "allowedImageRegistries"),
        ({"extraEnv": [{"name": "VLLM_OPERATOR_ALLOWED_IMAGE_REGISTRIES", "value": ""}]}, "extraEnv"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
        ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, "metrics.service"),
    ],
)
def test_bad_values_fail_at_install(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError, match=complaint.split(".")[0]):
        render(values)


# --- RBAC ------------------------------------------------------------------------------------------------
# The operator's rights, resource by resource: exactly what its code uses, nothing more. The chart renders this
# table into the ClusterRole (cluster-wide) or into one Role per watched namespace; the tests below derive the
# same table from the code (KubeClient calls, kopf handlers, ownerReferences), so a call added without RBAC, or a
# right left behind by a call removed, fails here.
NAMESPACED_RIGHTS: dict[tuple[str, str], set[str]] = {
    ("vllm-operator.io", "vllmmodels"): {"list", "watch"},  # kopf's watch and index of the models
    ("vllm-operator.io", "vllmmodels/status"): {"patch"},  # KubeClient.patch_status
    ("vllm-operator.io", "vllmmodels/finalizers"): {"update"},  # blockOwnerDeletion on the children
    # get: a pvc:// model's claim; delete: a scaled-down replica's claim past spec.cache.scaledDownRetentionSeconds
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"list", "watch", "create", "patch"},
    ("apps", "deployments"): {"list", "watch", "create", "patch", "delete"},  # delete: a change of cache.sharing
    ("apps", "statefulsets"): {"list", "watch", "create", "patch", "delete"},  # cache.sharing PerReplica
    ("policy", "poddisruptionbudgets"): {"list", "watch", "create", "patch", "delete"},  # 2+ replicas only
    ("networking.k8s.io", "networkpolicies"): {"list", "watch", "create", "patch"},  # the sibling port
    ("batch", "jobs"): {"list", "watch", "create", "patch", "delete"},  # cache Jobs no longer wanted go
    ("", "pods"): {"list", "watch"},  # read only: termination messages, crash-loop reasons
    ("", "configmaps"): {"list", "watch", "create", "patch"},  # only its own: the adapters file (spec.adapters)
    ("", "events"): {"create"},  # KubeClient.post_event
    # spec.autoscaling / spec.routing: the operator's own autoscaler and InferencePool, deleted when turned off or
    # when the engine switches.
    ("keda.sh", "scaledobjects"): {"list", "watch", "create", "patch", "delete"},
    ("autoscaling", "horizontalpodautoscalers"): {"list", "watch", "create", "patch", "delete"},
    ("inference.networking.k8s.io", "inferencepools"): {"list", "watch", "create", "patch", "delete"},
}
# Cluster-wide mode only: kopf's scanning notices the CRD (namespaced mode disables scanning, reads nothing).
CLUSTER_ONLY_RIGHTS: dict[tuple[str, str], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# KubeClient's methods and the verb each costs; "apply" is server-side apply: patch, and create when new.
CLIENT_VERBS: dict[str, set[str]] = {
    "get": {"get"}, "list": {"list"}, "apply": {"create", "patch"}, "patch_status": {"patch"},
    "post_event": {"create"}, "delete": {"delete"},
    "served": set(),  # discovery (GET /apis/<group>/<version>): every authenticated user may (system:discovery)
}  # fmt: skip
OPERATOR_SOURCES = ROOT / "operator" / "vllm_operator"


def _rights(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    rights: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/nonResourceURLs surprises
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rights.setdefault((group, resource), set()).update(rule["verbs"])
    return rights


def test_cluster_wide_rbac_is_one_cluster_role_with_exactly_the_table() -> None:
    objects = render_objects()
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    assert _rights(role["rules"]) == {**NAMESPACED_RIGHTS, **CLUSTER_ONLY_RIGHTS}
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-vllm-operator", "namespace": NAMESPACE}]


def test_namespaced_rbac_grants_the_table_only_in_watched_namespaces_and_nothing_cluster_wide() -> None:
    objects = render_objects(VALUE_SETS["namespaced"])
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rights(role["rules"]) == NAMESPACED_RIGHTS
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # kopf runs with scanning disabled here: no namespaces, no CRDs, no cluster-scoped role at all.
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")


def test_rights_table_is_least_privilege() -> None:
    assert NAMESPACED_RIGHTS[("", "pods")] <= {"get", "list", "watch"}
    assert NAMESPACED_RIGHTS[("", "events")] == {"create"}
    for (group, resource), verbs in {**NAMESPACED_RIGHTS, **CLUSTER_ONLY_RIGHTS}.items():
        assert "*" not in verbs and "*" not in (group, resource), (group, resource)
        assert resource not in {"secrets", "namespaces"}, "the operator never reads these"
        if "delete" in verbs or "deletecollection" in verbs:
            # Cache Jobs no longer wanted, expired claims of scaled-down replicas, the workload of a former
            # cache.sharing, a disruption budget for fewer than 2 replicas: each only of its own models.
            assert (group, resource) in {("batch", "jobs"), ("", "persistentvolumeclaims"), ("apps", "deployments"),
                                         ("apps", "statefulsets"), ("policy", "poddisruptionbudgets"),
                                         ("keda.sh", "scaledobjects"), ("autoscaling", "horizontalpodautoscalers"),
                                         ("inference.networking.k8s.io", "inferencepools")}, resource  # fmt: skip
        assert "deletecollection" not in verbs


def _client_calls() -> list[tuple[str, str, ast.Call | None]]:
    """(file, KubeClient method, call) for every use of ``<...client>.<method>`` in the operator's sources; the
    call is None where the method is passed on rather than called (``events or client.post_event``)."""
    uses: list[tuple[str, str, ast.Call | None]] = []
    for path in sorted(OPERATOR_SOURCES.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        called = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in CLIENT_VERBS:
                receiver = ast.unparse(node.value)
                if receiver.split(".")[-1].lstrip("_") in {"client", "kube_client", "api"}:
                    uses.append((path.name, node.attr, called.get(id(node))))
    return uses


def _resource_named(node: ast.expr | None) -> Any:
    """The kube.Resource a call argument names literally (``kube.JOBS`` or ``JOBS``), else None."""
    from vllm_operator import kube

    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    found = getattr(kube, name, None) if name else None
    return found if isinstance(found, kube.Resource) else None


def _deleted_resources() -> set[Any]:
    """Resources the plan asks to delete: the literal resource of every ``Delete(...)`` it builds."""
    found = set()
    for path in sorted(OPERATOR_SOURCES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Delete":
                argument = node.args[0] if node.args else next(
                    (k.value for k in node.keywords if k.arg == "resource"), None)  # fmt: skip
                resource = _resource_named(argument)
                assert resource is not None, f"{path.name}:{node.lineno}: Delete() of a resource not named literally"
                found.add(resource)
    return found


def _rights_the_code_needs(namespaces: tuple[str, ...]) -> dict[tuple[str, str], set[str]]:
    from vllm_operator import builders, kube, runner
    from vllm_operator.config import Config
    from vllm_operator.model import VLLMModel

    needed: dict[tuple[str, str], set[str]] = {}

    def need(group: str, resource: str, verbs: set[str]) -> None:
        needed.setdefault((group, resource), set()).update(verbs)

    model = VLLMModel.from_body({"metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
                                 "spec": {"model": "org/name", "adapters": [{"name": "a", "model": "org/a"}]}})  # fmt: skip
    children = builders.children_for(model, Config(), "0" * 40)
    fleet = VLLMModel.from_body({"metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
                                 "spec": {"model": "org/name", "replicas": 2}})  # RWO: a claim per replica  # fmt: skip
    children += builders.children_for(fleet, Config(), "0" * 40)
    for engine in ("keda", "hpa"):  # spec.autoscaling and spec.routing: the autoscaler and the InferencePool
        scaled = VLLMModel.from_body({"metadata": {"name": "m", "namespace": "ns", "uid": "u1"}, "spec": {
            "model": "org/name", "autoscaling": {"engine": engine, "maxReplicas": 1}, "routing": {"inferencePool": True}}})  # fmt: skip
        children += builders.children_for(scaled, Config(prometheus_address="http://prometheus:9090"), "0" * 40)
    for path, method, call in _client_calls():
        verbs = CLIENT_VERBS[method]
        if method == "apply":  # the object's kind decides: every child the builders make
            for child in children:
                resource = kube.resource_of(child)
                need(resource.group, resource.plural, verbs)
        elif method == "post_event":
            need("", "events", verbs)
        else:
            resource = _resource_named(call.args[0] if call is not None and call.args else None)
            targets = {resource} if resource else _deleted_resources() if method == "delete" else set()
            where = f"{path}:{call.lineno}: {ast.unparse(call)[:80]}" if call is not None else f"{path}: {method}"
            assert targets, f"{where}: name the resource (kube.X) literally, so its RBAC can be checked"
            for target in targets:
                plural = target.plural + ("/status" if method == "patch_status" else "")
                need(target.group, plural, verbs)
    # kopf: every handler's resource is listed and watched; change handlers and daemons also patch it (progress
    # annotations, finalizers). The registries are kopf's own (no public accessor).
    registry = runner.build_registry(Config(), namespaces)
    for kind, verbs in (("_indexing", {"list", "watch"}), ("_watching", {"list", "watch"}),
                        ("_changing", {"list", "watch", "patch"}), ("_spawning", {"list", "watch", "patch"})):
        for selector in getattr(registry, kind).get_all_selectors():
            need(selector.group or "", selector.plural or selector.any_name, verbs)  # fmt: skip
    # kopf itself posts Events for handler log lines (settings.posting), unless switched off.
    if "posting.enabled = False" not in (OPERATOR_SOURCES / "handlers.py").read_text():
        need("", "events", {"create"})
    if any(ref.get("blockOwnerDeletion") for child in children for ref in child["metadata"].get("ownerReferences", [])):
        need(kube.VLLMMODELS.group, kube.VLLMMODELS.plural + "/finalizers", {"update"})
    return needed


def test_kube_client_methods_all_have_a_verb() -> None:
    """A new KubeClient method must say here which verb it costs (and the chart must grant it)."""
    import inspect

    from vllm_operator.kube import KubeClient

    public = {name for name, _ in inspect.getmembers(KubeClient, inspect.iscoroutinefunction)} - {"close"}
    public = {name for name in public if not name.startswith("_")}
    assert public == set(CLIENT_VERBS), "map every KubeClient method to its RBAC verbs in CLIENT_VERBS"


def test_rights_table_is_exactly_what_the_code_uses() -> None:
    calls = _client_calls()
    assert {method for _, method, _ in calls} >= {"apply", "patch_status"}, "the scan finds the client's calls"
    for namespaces in ((), ("team-a",)):
        assert _rights_the_code_needs(namespaces) == NAMESPACED_RIGHTS, f"namespaces={namespaces}"


# --- monitoring ----------------------------------------------------------------------------------------


def test_model_monitors_select_the_operators_children_on_their_metrics_port() -> None:
    from vllm_operator import builders
    from vllm_operator.config import Config
    from vllm_operator.model import VLLMModel

    model = VLLMModel.from_body(
        {"metadata": {"name": "qwen", "namespace": "llm", "uid": "u1"}, "spec": {"model": "Qwen/Qwen2.5-0.5B"}}
    )
    config = Config()
    job = builders.cache_job_for(model, config)
    deployment = builders.deployment_for(model, config, "0" * 40)
    service = builders.service_for(model, config)
    objects = render_objects(VALUE_SETS["monitoring"])
    pod_monitor = one(objects, "PodMonitor")
    service_monitor = [m for m in by_kind(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-models")][0]

    for pod_template in (job["spec"]["template"], deployment["spec"]["template"]):
        labels = pod_template["metadata"]["labels"]
        assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        port_names = {p["name"] for c in pod_template["spec"]["containers"] for p in c.get("ports", [])}
        assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in port_names
        # The relabelings read these pod labels (Prometheus turns '.', '/' and '-' into '_').
        for relabel in pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]:
            source = relabel["sourceLabels"][0]
            if source.startswith("__meta_kubernetes_pod_label_"):
                assert source.removeprefix("__meta_kubernetes_pod_label_") in {_prom(k) for k in labels}
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}

    namespaced = one(render_objects(VALUE_SETS["namespaced-monitoring"]), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}


def test_operator_service_monitor_scrapes_the_operator_metrics_port() -> None:
    objects = render_objects(VALUE_SETS["monitoring"])
    (monitor,) = [m for m in by_kind(objects, "ServiceMonitor") if not m["metadata"]["name"].endswith("-models")]
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    deployment = one(objects, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_dashboard_configmap_is_picked_up_by_the_grafana_sidecar() -> None:
    (configmap,) = [o for o in render_objects(VALUE_SETS["monitoring"]) if o["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Requests", "GPU memory", "Cache", "Start-up phases", "Weight download",
                   "LoRA adapters: loaded / ready replicas"):
        assert wanted in titles
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace", "model"}
    assert not by_kind(render_objects(), "ConfigMap"), "the dashboard is opt-in"


def test_notes_tell_the_next_steps() -> None:
    notes = render()["vllm-operator/templates/NOTES.txt"]
    assert "kubectl wait --for=condition=Ready vllmmodel/" in notes
    assert "helm show crds" in notes
    namespaced = render(VALUE_SETS["namespaced"])["vllm-operator/templates/NOTES.txt"]
    assert "watching only: team-a, team-b" in namespaced


# --- scanners ------------------------------------------------------------------------------------------


def _write_rendered(directory: Path) -> None:
    for name, values in VALUE_SETS.items():
        for path, text in render(values).items():
            if not path.endswith(".txt") and text.strip():
                out = directory / name / Path(path).name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text.strip() + "\n")  # as `helm template` prints it


def test_checkov_passes_on_the_rendered_chart(tmp_path: Path) -> None:
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "checkov lives in its own venv: run scripts/setup.sh"
    _write_rendered(tmp_path)
    result = subprocess.run(
        [str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--compact", "--quiet",
         "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_yamllint_passes_on_chart_examples_and_rendered_output(tmp_path: Path) -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(ROOT / ".yamllint"))
    # Rendered output: the embedded dashboard JSON has long lines by nature.
    rendered_config = YamlLintConfig(
        yaml.safe_dump({"extends": str(ROOT / ".yamllint"), "rules": {"line-length": "disable"}})
    )
    _write_rendered(tmp_path)
    sources = [p for d in ("charts", "examples", "deploy", "crds") for p in (ROOT / d).rglob("*.yaml")]
    sources = [p for p in sources if "templates" not in p.parts] + [ROOT / ".yamllint"]
    problems = []
    for path, cfg in [(p, config) for p in sources] + [(p, rendered_config) for p in tmp_path.rglob("*.yaml")]:
        for problem in linter.run(path.read_text(), cfg, str(path)):
            if problem.level == "error":
                problems.append(f"{path}:{problem.line}:{problem.column} {problem.desc}")
    assert not problems, "\n".join(problems)


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def _prom(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def _example(prop: dict[str, Any]) -> Any:
    """A value that the property's schema accepts."""
    if "enum" in prop:
        return prop["enum"][0]
    if prop["type"] != "string":
        return {"integer": 3, "number": 2.5}[prop["type"]]
    pattern = prop.get("pattern", "")
    if "http" in pattern:
        return "https://example"
    return "1Gi" if "Gi" in pattern else "x"


def test_dashboard_json_is_what_its_generator_writes() -> None:
    generator = CHART / "files" / "dashboards" / "generate.py"
    result = subprocess.run([sys.executable, str(generator), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, f"vllm-models.json is stale: run python {generator.relative_to(ROOT)}"
    with helm.Chart.load(CHART) as chart:
        assert not [f["name"] for f in chart.files if f["name"].endswith(".py")], "the generator stays out of the chart"


def test_chart_versions_and_images_follow_the_project() -> None:
    import tomllib

    from vllm_operator.config import Config

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    env = one(render_objects(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    runtime_image = {e["name"]: e.get("value") for e in env}["VLLM_OPERATOR_RUNTIME_IMAGE"]
    assert runtime_image == Config().runtime_image, "the chart and the operator default to the same runtime image"
