"""Unit tests of the pure child-object builders and the operator's Config (no cluster, no I/O)."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest

from vllm_operator import builders
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_runtime import layout, vllm_args

CONFIG = Config()
COMMIT = "7ae557604adf67be50417f59c2c2f167def9a775"
LABEL_KEYS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "vllm-operator.io/model",
}


def make(status: dict[str, Any] | None = None, name: str = "chat", **spec: Any) -> VLLMModel:
    spec.setdefault("model", "Qwen/Qwen2.5-0.5B-Instruct")
    return VLLMModel.from_body(
        {"metadata": {"name": name, "namespace": "ml", "uid": "u-1", "generation": 3}, "spec": spec, "status": status or {}}
    )


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_of(obj: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj)["env"]}


def children(model: VLLMModel, config: Config = CONFIG) -> list[dict[str, Any]]:
    return builders.children_for(model, config, COMMIT)


# --- the typed view ----------------------------------------------------------------------------------


def test_model_view_applies_crd_defaults() -> None:
    m = make()
    assert (m.name, m.namespace, m.uid, m.generation) == ("chat", "ml", "u-1", 3)
    assert (m.revision, m.replicas, m.tensor_parallel_size) == ("main", 1, 1)
    assert m.spec["gpuMemoryUtilization"] == 0.9 and m.cache["deletePolicy"] == "Retain"
    assert m.source.repo_id == "Qwen/Qwen2.5-0.5B-Instruct" and m.model_argument == m.source.repo_id


@pytest.mark.parametrize("body", [{"metadata": {"name": "x"}, "spec": {}}, {"metadata": {"name": "x"}, "spec": {"model": "x"}}])
def test_model_view_names_spec_model_when_bad(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"spec\.model"):
        VLLMModel.from_body(body)


@pytest.mark.parametrize(
    ("tp", "status", "gpus"),
    [(1, {}, 1), (4, {}, 4), ("auto", {}, 1), ("auto", {"plan": {"tensorParallelSize": 2}}, 2),
     ("auto", {"plan": {"tensor_parallel_size": 8}}, 8)],
)  # fmt: skip
def test_gpus_per_pod_follow_tensor_parallel_size(tp: int | str, status: dict[str, Any], gpus: int) -> None:
    m = make(status=status, tensorParallelSize=tp, gpu={"type": "H100"})
    c = container(builders.deployment_for(m, CONFIG, COMMIT))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # vLLM is told the same number of GPUs the pod gets.
    assert vllm_args.settings_from_flags(c["args"][c["args"].index("--") + 1 :])["tensorParallelSize"] == gpus


@pytest.mark.parametrize(
    ("status", "max_model_len"),
    [({}, None), ({"plan": {"max_model_len": 12288}}, 12288), ({"plan": {"maxModelLen": 8192}}, 8192)],
)
def test_auto_context_length_uses_the_plan_once_known(status: dict[str, Any], max_model_len: int | None) -> None:
    m = make(status=status, maxModelLen="auto", gpu={"type": "L4"})
    c = container(builders.deployment_for(m, CONFIG, COMMIT))
    assert vllm_args.settings_from_flags(c["args"][c["args"].index("--") + 1 :]).get("maxModelLen") == max_model_len


# --- labels and names --------------------------------------------------------------------------------


def test_every_child_carries_the_labels_and_namespace() -> None:
    for obj in children(make()):
        labels = obj["metadata"]["labels"]
        assert set(labels) == LABEL_KEYS, obj["kind"]
        assert labels["app.kubernetes.io/instance"] == labels["vllm-operator.io/model"] == "chat"
        assert labels["app.kubernetes.io/managed-by"] == "vllm-operator"
        assert obj["metadata"]["namespace"] == "ml"
    kinds = {o["kind"]: o["metadata"]["labels"]["app.kubernetes.io/component"] for o in children(make())}
    assert kinds == {"PersistentVolumeClaim": "cache", "Job": "cache", "Deployment": "server", "Service": "server"}


@pytest.mark.parametrize(
    ("uid", "delete_policy", "owned_kinds"),
    [
        ("u-1", "Retain", {"Job", "Deployment", "Service"}),  # Retain: the cache outlives the model
        ("u-1", "Delete", {"PersistentVolumeClaim", "Job", "Deployment", "Service"}),
        (None, "Delete", set()),  # no uid (a file given to render): nothing can be referenced
    ],
)
def test_owner_references_follow_the_uid_and_the_delete_policy(
    uid: str | None, delete_policy: str, owned_kinds: set[str]
) -> None:
    body = {"metadata": {"name": "chat", "namespace": "ml", "uid": uid},
            "spec": {"model": "o/n", "cache": {"deletePolicy": delete_policy}}}  # fmt: skip
    objs = builders.children_for(VLLMModel.from_body(body), CONFIG, COMMIT)
    assert {o["kind"] for o in objs if "ownerReferences" in o["metadata"]} == owned_kinds
    for obj in objs:
        for ref in obj["metadata"].get("ownerReferences", []):
            assert ref == builders.owner_reference_for(VLLMModel.from_body(body))


def test_bookkeeping_annotations_come_from_the_builders() -> None:
    m = make(gpu={"type": "L4"})
    job = builders.cache_job_for(m, CONFIG, claim_uid="pvc-1")
    ann = job["metadata"]["annotations"]
    assert ann[builders.ANNOTATION_SPEC_HASH] == builders.spec_hash(job["spec"])
    assert ann[builders.ANNOTATION_CLAIM_UID] == "pvc-1"
    assert builders.ANNOTATION_PLAN_DIGEST in ann, "spec.gpu: the Job plans, for these planner inputs"
    assert builders.ANNOTATION_PLAN_DIGEST not in builders.cache_job_for(make(), CONFIG)["metadata"]["annotations"]
    assert builders.ANNOTATION_CLAIM_UID not in builders.cache_job_for(m, CONFIG)["metadata"]["annotations"]
    dep = builders.deployment_for(m, CONFIG, COMMIT, claim_uid="pvc-1")
    assert dep["metadata"]["annotations"][builders.ANNOTATION_CLAIM_UID] == "pvc-1"
    assert builders.ANNOTATION_CLAIM_UID not in dep["spec"]["template"]["metadata"]["annotations"]


def test_spec_hash_ignores_only_the_ttl_set_on_a_finished_job() -> None:
    m = make()
    plain = builders.cache_job_for(m, CONFIG)
    with_ttl = builders.cache_job_for(m, CONFIG, ttl_seconds=60)
    assert with_ttl["spec"]["ttlSecondsAfterFinished"] == 60
    assert with_ttl["metadata"]["annotations"] == plain["metadata"]["annotations"]
    other = builders.cache_job_for(make(image="reg/other:1"), CONFIG)
    assert other["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH] != (
        plain["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
    )


def test_a_revision_resolving_to_the_served_commit_keeps_the_pod_template() -> None:
    """Pinning ``main`` to the commit it resolved to (the usual GitOps step) must replace no pod."""
    on_branch = builders.deployment_for(make(revision="main"), CONFIG, COMMIT, claim_uid="pvc-1")
    pinned = builders.deployment_for(make(revision=COMMIT), CONFIG, COMMIT, claim_uid="pvc-1")
    tagged = builders.deployment_for(make(revision="v1.0"), CONFIG, COMMIT, claim_uid="pvc-1")
    assert on_branch["spec"]["template"] == pinned["spec"]["template"] == tagged["spec"]["template"]
    assert "vllm-operator.io/revision" not in on_branch["spec"]["template"]["metadata"]["annotations"]
    # The Deployment itself still says which revision it follows.
    assert on_branch["metadata"]["annotations"]["vllm-operator.io/revision"] == "main"
    assert pinned["metadata"]["annotations"]["vllm-operator.io/revision"] == COMMIT


def test_cache_job_name_is_per_model_and_revision() -> None:
    m = make()
    name = builders.cache_job_name(m)
    assert re.fullmatch(r"chat-cache-[0-9a-f]{8}", name)
    assert builders.cache_job_name(m, "main") == name
    assert builders.cache_job_name(m, COMMIT) != name
    assert builders.cache_job_name(make(model="Qwen/Qwen2.5-1.5B-Instruct")) != name
    assert builders.cache_job_for(m, CONFIG, COMMIT)["metadata"]["name"] == builders.cache_job_name(m, COMMIT)
    assert len(builders.cache_job_name(make(name="a" * 48))) == 63  # a label value's maximum


def test_owner_reference_points_at_the_model() -> None:
    ref = builders.owner_reference_for(make())
    assert ref == {"apiVersion": "vllm-operator.io/v1alpha1", "kind": "VLLMModel", "name": "chat", "uid": "u-1",
                   "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def test_endpoint_and_selector() -> None:
    m = make()
    assert builders.endpoint_for(m) == "http://chat.ml.svc:8000/v1"
    assert builders.selector_string(m) == (
        "app.kubernetes.io/name=vllm-model,app.kubernetes.io/instance=chat,app.kubernetes.io/component=server"
    )
    dep = builders.deployment_for(m, CONFIG, COMMIT)
    assert dep["spec"]["selector"]["matchLabels"] == builders.selector_for(m)
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert builders.selector_for(m).items() <= template_labels.items()
    assert builders.service_for(m, CONFIG)["spec"]["selector"] == builders.selector_for(m)


# --- cache PVC ---------------------------------------------------------------------------------------

GIB = 1024**3


@pytest.mark.parametrize(
    ("spec", "status", "config", "size"),
    [
        ({}, {}, CONFIG, "100Gi"),  # nothing known yet: the configured default
        ({}, {}, Config(default_cache_size="20Gi"), "20Gi"),
        ({"cache": {"size": "7Gi"}}, {"plan": {"weight_bytes": 100 * GIB}}, CONFIG, "7Gi"),  # the spec wins
        ({}, {"plan": {"weight_bytes": 10 * GIB}}, CONFIG, "22Gi"),  # 10 GiB x 2.2 headroom
        ({}, {"plan": {"weightBytes": 10 * GIB}}, Config(cache_size_headroom=1.5), "15Gi"),
        ({}, {"cache": {"bytes": 1000}}, CONFIG, "1Gi"),  # at least 1 GiB
        ({}, {"plan": {"weight_bytes": 10 * GIB}, "cache": {"bytes": 20 * GIB}}, CONFIG, "44Gi"),  # the larger
    ],
)
def test_cache_pvc_size(spec: dict[str, Any], status: dict[str, Any], config: Config, size: str) -> None:
    pvc = builders.cache_pvc_for(make(status=status, **spec), config)
    assert pvc is not None
    assert pvc["spec"]["resources"]["requests"]["storage"] == size


@pytest.mark.parametrize(
    ("spec", "config", "storage_class", "modes"),
    [
        ({}, CONFIG, None, ["ReadWriteOnce"]),
        ({}, Config(default_storage_class="standard"), "standard", ["ReadWriteOnce"]),
        ({"cache": {"storageClassName": "nfs", "accessModes": ["ReadWriteMany"]}}, Config(default_storage_class="x"),
         "nfs", ["ReadWriteMany"]),
    ],
)  # fmt: skip
def test_cache_pvc_class_and_modes(spec: dict[str, Any], config: Config, storage_class: str | None, modes: list[str]) -> None:
    pvc = builders.cache_pvc_for(make(**spec), config)
    assert pvc is not None and pvc["metadata"]["name"] == "chat-cache"
    assert pvc["spec"].get("storageClassName") == storage_class
    assert pvc["spec"]["accessModes"] == modes


@pytest.mark.parametrize(
    ("spec", "claim"),
    [({"cache": {"existingClaim": "shared"}}, "shared"), ({"model": "pvc://store/llama"}, None)],
)
def test_no_cache_pvc_for_existing_claim_or_volume_model(spec: dict[str, Any], claim: str | None) -> None:
    m = make(**spec)
    assert builders.cache_pvc_for(m, CONFIG) is None
    volumes = {v["name"]: v for v in builders.deployment_for(m, CONFIG, COMMIT)["spec"]["template"]["spec"]["volumes"]}
    if claim:
        assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim
    else:
        assert volumes["cache"] == {"name": "cache", "emptyDir": {}}


def test_delete_policy_is_recorded_on_the_pvc() -> None:
    pvc = builders.cache_pvc_for(make(cache={"deletePolicy": "Delete"}), CONFIG)
    assert pvc is not None and pvc["metadata"]["annotations"]["vllm-operator.io/delete-policy"] == "Delete"


# --- cache Job ---------------------------------------------------------------------------------------


def test_cache_job_runs_the_runtime_cache_command() -> None:
    job = builders.cache_job_for(make(revision="v2"), CONFIG)
    c = container(job)
    assert c["command"] == ["vllm-runtime"]
    assert c["args"][:9] == ["cache", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--revision", "v2",
                             "--cache-dir", "/cache", "--metrics-port", "9090"]  # fmt: skip
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == layout.TERMINATION_MESSAGE_PATH
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == CONFIG.cache_job_backoff_limit
    fail_rule = spec["podFailurePolicy"]["rules"][0]
    assert fail_rule["action"] == "FailJob"
    assert fail_rule["onExitCodes"] == {"containerName": "cache", "operator": "In", "values": [3]}
    assert job["metadata"]["annotations"]["vllm-operator.io/revision"] == "v2"
    assert spec["activeDeadlineSeconds"] == 6 * 3600, "a stuck download ends by default"
    assert "ttlSecondsAfterFinished" not in spec, "the status needs a finished Job until its commit is deployed"
    assert builders.cache_job_for(make(), Config(cache_job_deadline_seconds=600))["spec"]["activeDeadlineSeconds"] == 600
    assert "activeDeadlineSeconds" not in builders.cache_job_for(make(), Config(cache_job_deadline_seconds=None))["spec"]


def test_cache_job_gets_the_token_only_as_a_secret_reference() -> None:
    job = builders.cache_job_for(make(hfTokenSecretRef={"name": "hf"}), Config(hf_endpoint="http://mirror:8080"))
    env = env_of(job)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert env["HF_ENDPOINT"] == "http://mirror:8080"
    assert env["HF_HUB_CACHE"] == "/cache/hub"
    assert "HF_HUB_OFFLINE" not in env
    no_token = env_of(builders.cache_job_for(make(), CONFIG))
    assert "HF_TOKEN" not in no_token and "HF_ENDPOINT" not in no_token
    # Model pods serve offline and never get the token.
    dep_env = env_of(builders.deployment_for(make(hfTokenSecretRef={"name": "hf"}), CONFIG, COMMIT))
    assert "HF_TOKEN" not in dep_env and dep_env["HF_HUB_OFFLINE"] == "1"


def test_volume_model_is_mounted_read_only_and_passed_as_a_directory() -> None:
    m = make(model="pvc://store/llama/8b")
    for obj in (builders.cache_job_for(m, CONFIG), builders.deployment_for(m, CONFIG, COMMIT)):
        c = container(obj)
        assert c["args"][c["args"].index("--model") + 1] == "/models/store/llama/8b"
        (mount,) = [v for v in c["volumeMounts"] if v["name"] == "model"]
        assert mount == {"name": "model", "mountPath": "/models/store", "readOnly": True}
        (volume,) = [v for v in obj["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"]
        assert volume["persistentVolumeClaim"] == {"claimName": "store", "readOnly": True}


# --- Deployment --------------------------------------------------------------------------------------


def test_deployment_serves_the_commit_with_the_spec_flags() -> None:
    spec = {"quantization": "awq", "maxModelLen": 4096, "enforceEager": True, "extraArgs": ["--max-num-seqs", "4"]}
    m = make(**spec)
    dep = builders.deployment_for(m, CONFIG, COMMIT)
    args = container(dep)["args"]
    assert args[: args.index("--")] == ["serve", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--revision", COMMIT,
                                        "--cache-dir", "/cache", "--port", "8000", "--metrics-port", "9090",
                                        "--endpoint-drain-seconds", "5", "--drain-timeout", "25"]  # fmt: skip
    assert args[args.index("--") + 1 :] == vllm_args.vllm_flags(m.spec)
    assert vllm_args.settings_from_flags(args[args.index("--") + 1 :])["maxModelLen"] == 4096
    assert dep["spec"]["template"]["metadata"]["annotations"]["vllm-operator.io/commit"] == COMMIT
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_server_pods_drain_within_their_grace_period() -> None:
    """SIGTERM: /ready fails and vLLM serves on for the endpoint drain, then drains in-flight requests; the
    kubelet's SIGKILL (after terminationGracePeriodSeconds) comes only after both and serve's own kill."""
    from vllm_runtime.serve import register

    dep = builders.deployment_for(make(), CONFIG, COMMIT)
    args = container(dep)["args"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    parsed = parser.parse_args(args)  # the flags exist in serve, spelled as the operator writes them
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert parsed.endpoint_drain_seconds == builders.ENDPOINT_DRAIN_SECONDS > 0
    assert parsed.drain_timeout == builders.DRAIN_TIMEOUT_SECONDS > 0
    assert grace >= parsed.endpoint_drain_seconds + parsed.drain_timeout + builders.STOP_MARGIN_SECONDS
    assert grace > 30  # more than Kubernetes' default, which the two drains alone would fill


def test_new_commit_changes_the_pod_template() -> None:
    m = make()
    old = builders.deployment_for(m, CONFIG, COMMIT)["spec"]["template"]
    new = builders.deployment_for(m, CONFIG, "b" * 40)["spec"]["template"]
    assert old != new
    assert builders.deployment_for(m, CONFIG, COMMIT)["spec"]["template"] == old  # deterministic


def test_probes_use_the_runtime_endpoints_and_allow_a_long_start() -> None:
    c = container(builders.deployment_for(make(), Config(startup_timeout_seconds=1800, probe_period_seconds=15), COMMIT))
    assert c["startupProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 1800
    dep = builders.deployment_for(make(), Config(startup_timeout_seconds=1800), COMMIT)
    assert dep["spec"]["progressDeadlineSeconds"] > 1800  # a long first start is not a stuck rollout
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "metrics": 9090}


def test_deployment_env_volumes_and_shm() -> None:
    m = make(env=[{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}])
    dep = builders.deployment_for(m, Config(shm_size="4Gi"), COMMIT)
    env = env_of(dep)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HUB_CACHE"] == "/cache/hub"
    assert env["VLLM_CACHE_ROOT"] == "/cache/compile"
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "chat-cache"
    mounts = {v["name"]: v["mountPath"] for v in container(dep)["volumeMounts"]}
    assert mounts == {"cache": "/cache", "tmp": "/tmp", "shm": "/dev/shm"}


PLACEMENT = {
    "nodeSelector": {"gpu": "l4"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
    "imagePullSecrets": [{"name": "regcred"}],
}


@pytest.mark.parametrize("field", sorted(PLACEMENT))
def test_placement_passes_through_to_model_pods_and_cache_jobs(field: str) -> None:
    m = make(**{field: PLACEMENT[field]})
    for obj in (builders.deployment_for(m, CONFIG, COMMIT), builders.cache_job_for(m, CONFIG)):
        assert obj["spec"]["template"]["spec"][field] == PLACEMENT[field]
    assert field not in builders.deployment_for(make(), CONFIG, COMMIT)["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("resources", "config", "expected"),
    [
        ({}, CONFIG, {"limits": {"nvidia.com/gpu": 2}}),
        ({"requests": {"cpu": "4"}, "limits": {"memory": "32Gi"}}, CONFIG,
         {"requests": {"cpu": "4"}, "limits": {"memory": "32Gi", "nvidia.com/gpu": 2}}),
        ({"requests": {"cpu": "4"}}, Config(gpu_resource=None), {"requests": {"cpu": "4"}}),
        ({}, Config(gpu_resource="amd.com/gpu"), {"limits": {"amd.com/gpu": 2}}),
    ],
)  # fmt: skip
def test_resources_merge_gpus(resources: dict[str, Any], config: Config, expected: dict[str, Any]) -> None:
    m = make(resources=resources, tensorParallelSize=2)
    assert container(builders.deployment_for(m, config, COMMIT)).get("resources", {}) == expected
    assert m.spec["resources"] == resources  # the model's spec is not modified


def test_image_runtime_class_and_pull_policy() -> None:
    config = Config(runtime_image="reg/runtime:1", image_pull_policy="Always", runtime_class_name="nvidia")
    dep = builders.deployment_for(make(), config, COMMIT)
    assert container(dep)["image"] == "reg/runtime:1" and container(dep)["imagePullPolicy"] == "Always"
    assert dep["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert container(builders.deployment_for(make(image="mine:2"), config, COMMIT))["image"] == "mine:2"
    assert container(builders.cache_job_for(make(image="mine:2"), config))["image"] == "mine:2"


def test_replicas() -> None:
    m = make(replicas=3, cache={"accessModes": ["ReadWriteMany"]})
    assert builders.deployment_for(m, CONFIG, COMMIT)["spec"]["replicas"] == 3


# --- Pod Security Standards "restricted" -------------------------------------------------------------


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """The checks of the "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    problems = []
    pod_sc = pod_spec.get("securityContext", {})
    if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod seccompProfile")
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}:
            problems.append(f"volume type {kinds}")
    for c in pod_spec["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{c['name']}: runAsUser 0")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: capabilities")
        if sc.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        if any("hostPort" in p for p in c.get("ports", [])):
            problems.append(f"{c['name']}: hostPort")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(key)
    return problems


@pytest.mark.parametrize(
    "spec", [{}, {"model": "pvc://store/m"}, {"cache": {"existingClaim": "c"}, "tensorParallelSize": 4}], ids=str
)
def test_pods_meet_restricted_pod_security(spec: dict[str, Any]) -> None:
    m = make(**spec)
    for obj in (builders.deployment_for(m, CONFIG, COMMIT), builders.cache_job_for(m, CONFIG)):
        pod = obj["spec"]["template"]["spec"]
        assert restricted_violations(pod) == []
        assert pod["automountServiceAccountToken"] is False  # pods need no API rights
        assert pod["enableServiceLinks"] is False  # a Service named "vllm" would set VLLM_PORT
        assert pod["securityContext"]["fsGroup"] == CONFIG.run_as_user


def test_restricted_check_catches_a_violation() -> None:
    pod = builders.deployment_for(make(), CONFIG, COMMIT)["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert restricted_violations(pod) == ["vllm: allowPrivilegeEscalation"]


# --- Service -----------------------------------------------------------------------------------------


def test_service_ports() -> None:
    svc = builders.service_for(make(), CONFIG)
    assert svc["metadata"]["name"] == "chat"
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http", 8000, "http"),
        ("metrics", 9090, "metrics"),
    ]


# --- Config ------------------------------------------------------------------------------------------


def test_config_from_env() -> None:
    config = Config.from_env(
        {
            "VLLM_OPERATOR_RUNTIME_IMAGE": "reg/rt:2",
            "VLLM_OPERATOR_NAMESPACES": "a, b,,c",
            "VLLM_OPERATOR_METRICS_PORT": "9100",
            "VLLM_OPERATOR_DEFAULT_STORAGE_CLASS": "fast",
            "VLLM_OPERATOR_CACHE_SIZE_HEADROOM": "1.5",
            "VLLM_OPERATOR_HF_ENDPOINT": "http://mirror",
            "VLLM_OPERATOR_GPU_RESOURCE": "",
            "VLLM_OPERATOR_CACHE_JOB_DEADLINE_SECONDS": "900",
            "UNRELATED": "x",
        }
    )
    assert config.runtime_image == "reg/rt:2"
    assert config.namespaces == ("a", "b", "c")
    assert config.metrics_port == 9100
    assert config.default_storage_class == "fast"
    assert config.cache_size_headroom == 1.5
    assert config.hf_endpoint == "http://mirror"
    assert config.gpu_resource is None  # set to empty: request no GPUs
    assert config.cache_job_deadline_seconds == 900
    assert Config.from_env({}) == Config()


@pytest.mark.parametrize(
    ("env", "deadline", "registries"),
    [
        ({}, 6 * 3600, ()),
        ({"VLLM_OPERATOR_CACHE_JOB_DEADLINE_SECONDS": "0"}, None, ()),
        ({"VLLM_OPERATOR_ALLOWED_IMAGE_REGISTRIES": " ghcr.io/org/ ,, reg.local:5000/team"}, 6 * 3600,
         ("ghcr.io/org/", "reg.local:5000/team")),
    ],
)  # fmt: skip
def test_config_cache_job_deadline_and_image_allowlist(
    env: dict[str, str], deadline: int | None, registries: tuple[str, ...]
) -> None:
    config = Config.from_env(env)
    assert config.cache_job_deadline_seconds == deadline
    assert config.allowed_image_registries == registries


@pytest.mark.parametrize(("name", "value"), [("METRICS_PORT", "eighty"), ("CACHE_SIZE_HEADROOM", "-1")])
def test_config_names_a_bad_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"VLLM_OPERATOR_{name}"):
        Config.from_env({f"VLLM_OPERATOR_{name}": value})
