"""The VLLMModel CRD: a structural schema, valid examples, and bad specs refused with messages naming the field.

The API server is stood in for by ``vllm_operator.validation`` (defaulting + jsonschema + cel-python; see
its docstring), through ``cel_eval``'s string form. ``render`` refuses input with the same code.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import cel_eval
from vllm_operator import crd
from vllm_runtime import layout, vllm_args

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def vllm_model(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"model": "Qwen/Qwen2.5-0.5B-Instruct", **spec},
    }


# --- the CRD object itself ---------------------------------------------------------------------------


def test_names_subresources_and_printer_columns() -> None:
    data = crd.load_crd()
    assert data["metadata"]["name"] == crd.CRD_NAME == "vllmmodels.vllm-operator.io"
    spec = data["spec"]
    assert (spec["group"], spec["scope"]) == (crd.GROUP, "Namespaced")
    assert spec["names"]["kind"] == crd.KIND and spec["names"]["plural"] == crd.PLURAL
    assert spec["names"]["shortNames"] == list(crd.SHORT_NAMES)
    (version,) = spec["versions"]
    assert version["name"] == crd.VERSION and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model"
    assert columns["Commit"] == ".status.resolvedRevision"
    assert columns["Quantization"] == ".spec.quantization"
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Phase"] == ".status.phase"
    assert columns["Age"] == ".metadata.creationTimestamp"


def _structural_problems(node: dict[str, Any], path: str, root: bool = False) -> list[str]:
    """Kubernetes' structural-schema rules (apiextensions "Specifying a structural schema")."""
    problems: list[str] = []
    int_or_string = node.get("x-kubernetes-int-or-string", False)
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "type" not in node and not int_or_string and not preserve:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        for sub in node.get(junctor, []) if junctor != "not" else [node.get("not", {})]:
            allowed_int_or_string = int_or_string and junctor == "anyOf" and sub in ({"type": "integer"}, {"type": "string"})
            forbidden = {"type", "description", "default", "additionalProperties", "nullable"} & set(sub)
            if forbidden and not allowed_int_or_string:
                problems.append(f"{path}.{junctor}: sets {sorted(forbidden)}")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    if node.get("x-kubernetes-list-type") == "map":
        required = set(node["items"].get("required", []))
        missing = set(node.get("x-kubernetes-list-map-keys", [])) - required
        if missing:
            problems.append(f"{path}: list-map keys {sorted(missing)} are not required")
    if "default" in node:
        try:
            jsonschema.Draft4Validator(node).validate(node["default"])
        except jsonschema.ValidationError as exc:
            problems.append(f"{path}: default does not validate: {exc.message}")
    for name, sub in (node.get("properties") or {}).items():
        if root and name == "metadata":
            if set(sub) - {"type"}:
                problems.append("metadata: only name/generateName may be restricted")
            continue
        problems += _structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_schema_is_structural() -> None:
    assert _structural_problems(crd.version_schema(), "", root=True) == []


@pytest.mark.parametrize("version", ["1.29.0", "1.32.0", "1.35.0"])
def test_crd_object_validates_against_official_schemas(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(crd.load_crd(), version, strict=True)


def test_every_cel_rule_compiles_names_a_field_and_iterates_only_bounded_lists() -> None:
    rules = list(cel_eval.all_rules())
    assert len(rules) >= 25
    for path, rule in rules:
        cel_eval.compile_rule(rule["rule"])
        message = rule["message"]
        assert "\n" not in message and len(message) <= 1024, f"{path}: the API server refuses this message"
        assert re.search(r"\b(spec|metadata)\.[A-Za-z]", message), f"{path}: message names no field: {message}"
    # The API server estimates each rule's cost: lists a rule iterates need maxItems, their strings maxLength.
    schema = crd.spec_schema()
    for field in ("extraArgs",):
        assert "maxItems" in schema["properties"][field] and "maxLength" in schema["properties"][field]["items"]
    assert "maxItems" in schema["properties"]["cache"]["properties"]["accessModes"]


def test_defaults_come_from_the_schema() -> None:
    spec = crd.apply_defaults({"model": "org/name", "hfTokenSecretRef": {"name": "t"}, "revision": None})
    assert spec == {
        "model": "org/name",
        "hfTokenSecretRef": {"name": "t", "key": "HF_TOKEN"},
        "revision": "main",  # a null that is not nullable is pruned, then defaulted
        "gpuMemoryUtilization": 0.9,
        "tensorParallelSize": 1,
        "trustRemoteCode": False,
        "replicas": 1,
        "cache": {"accessModes": ["ReadWriteOnce"], "deletePolicy": "Retain"},
    }
    # Values that are given are kept, and the input is not modified.
    given = {"model": "o/n", "replicas": 0, "cache": {"accessModes": ["ReadWriteMany"]}}
    assert crd.apply_defaults(given)["replicas"] == 0
    assert crd.apply_defaults(given)["cache"]["accessModes"] == ["ReadWriteMany"]
    assert given == {"model": "o/n", "replicas": 0, "cache": {"accessModes": ["ReadWriteMany"]}}


def test_crd_is_packaged_into_the_wheel() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"crds/vllmmodel.yaml" = "vllm_operator/crds/vllmmodel.yaml"' in pyproject
    assert crd.crd_path().resolve() == (ROOT / "crds" / "vllmmodel.yaml").resolve()


# --- examples ----------------------------------------------------------------------------------------


def test_there_is_an_example_for_every_tutorial_scenario() -> None:
    specs = [d["spec"] for f in EXAMPLES for d in yaml.safe_load_all(f.read_text()) if d]
    assert len(specs) >= 10
    assert any(s.get("quantization", "").startswith("gptq") for s in specs)
    assert any(s.get("quantization", "").startswith("awq") for s in specs)
    assert any(s.get("quantization") == "fp8" for s in specs)
    assert any(s["model"].startswith("pvc://") for s in specs)
    assert any(s.get("trustRemoteCode") for s in specs)
    assert any(len(s.get("revision", "")) == 40 for s in specs)
    assert any(isinstance(s.get("tensorParallelSize"), int) and s["tensorParallelSize"] >= 2 for s in specs)
    assert any(s.get("hfTokenSecretRef") for s in specs)
    assert any(s.get("gpuMemoryUtilization", 0.9) < 0.9 and s.get("maxModelLen") for s in specs)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_and_commented(path: Path) -> None:
    text = path.read_text()
    assert text.count("\n# ") >= 2, "each example explains itself in comments"
    documents = [d for d in yaml.safe_load_all(text) if d]
    assert documents
    for document in documents:
        assert cel_eval.validate(document) == []


# --- valid and invalid specs -------------------------------------------------------------------------

GOOD_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("replicas with RWX cache", {"replicas": 3, "cache": {"accessModes": ["ReadWriteMany"]}}),
    ("replicas with existing claim", {"replicas": 2, "cache": {"existingClaim": "shared-models"}}),
    ("replicas of a pvc model", {"model": "pvc://store/m", "replicas": 2}),
    ("pvc model with existing claim", {"model": "pvc://store/m", "cache": {"existingClaim": "compile-cache"}}),
    ("auto sizes with a gpu", {"tensorParallelSize": "auto", "maxModelLen": "auto", "gpu": {"type": "H100"}}),
    ("gpu by memory", {"gpu": {"memory": "24Gi"}}),
    ("benign extra args", {"extraArgs": ["--max-num-seqs", "8", "--enable-prefix-caching", "--model-loader-extra-config", "{}"]}),
    ("awq with float16", {"quantization": "awq", "dtype": "float16"}),
    ("env from a secret", {"env": [{"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
    ("integer cache size", {"cache": {"size": 10737418240}}),
    ("full memory fraction", {"gpuMemoryUtilization": 1}),
    ("zero replicas", {"replicas": 0}),
    ("replicas on RWO: a volume per replica", {"replicas": 4}),
    ("autoscaling on RWO: a volume per replica", {"autoscaling": {"maxReplicas": 4}}),
    ("explicit per-replica", {"replicas": 2, "cache": {"sharing": "PerReplica", "scaledDownRetentionSeconds": 60}}),
    ("shared on RWX", {"replicas": 2, "cache": {"sharing": "Shared", "accessModes": ["ReadWriteMany"]}}),
    ("in-place rollout, pdb percentage, no spread", {"rollout": {"strategy": "InPlace"},
     "podDisruptionBudget": {"maxUnavailable": "25%"}, "topologySpreadConstraints": []}),
    ("a tag", {"revision": "v1.0"}),
    ("a pull request ref", {"revision": "refs/pr/1"}),
    ("a branch with '@' and '_'", {"revision": "feature/a_b@2"}),
    ("a 96-character repo name", {"model": "org/" + "a" * 96}),
    ("a repo id with '_' and '.'", {"model": "my_org/Qwen2.5-0.5B_x"}),
    ("a pvc path with dots inside names", {"model": "pvc://store/my.model/v1..2"}),
    ("an exact flag that prefixes an owned one", {"extraArgs": ["--tokenizer", "org/tok", "--tokenizer=org/tok"]}),
    ("short flags vLLM has", {"extraArgs": ["-O3", "-pp", "2", "-dp=2"]}),
    ("--no- of a flag not owned", {"extraArgs": ["--no-enable-prefix-caching"]}),
    ("served name with a dash inside", {"servedModelName": "chat-v2"}),
    ("empty resource claims", {"resources": {"claims": []}}),
]


@pytest.mark.parametrize(("case", "spec"), GOOD_SPECS, ids=[c for c, _ in GOOD_SPECS])
def test_valid_specs_are_accepted(case: str, spec: dict[str, Any]) -> None:
    assert cel_eval.validate(vllm_model(**spec)) == [], case


# (case, spec fields, the field the message must name, words the message must contain)
BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    ("squeezellm", {"quantization": "squeezellm"}, "spec.quantization", "removed squeezellm; use"),
    ("removed method", {"quantization": "aqlm"}, "spec.quantization", "no longer has"),
    ("unknown method", {"quantization": "int3"}, "spec.quantization", "is not one of"),
    ("memory fraction 0", {"gpuMemoryUtilization": 0}, "spec.gpuMemoryUtilization", ""),
    ("memory fraction > 1", {"gpuMemoryUtilization": 1.2}, "spec.gpuMemoryUtilization", ""),
    ("context as words", {"maxModelLen": "long"}, "spec.maxModelLen", "or 'auto'"),
    ("context too short", {"maxModelLen": 8}, "spec.maxModelLen", "between 16"),
    ("context auto without gpu", {"maxModelLen": "auto"}, "spec.maxModelLen", "needs spec.gpu"),
    ("zero gpus", {"tensorParallelSize": 0}, "spec.tensorParallelSize", "from 1 to 64"),
    ("auto gpus without gpu", {"tensorParallelSize": "auto"}, "spec.tensorParallelSize", "needs spec.gpu"),
    ("owned flag", {"extraArgs": ["--max-model-len", "4096"]}, "spec.extraArgs", "spec.extraArgs may not contain a flag"),
    ("owned flag, underscores", {"extraArgs": ["--max_model_len=4096"]}, "spec.extraArgs", "maxModelLen"),
    ("owned short flag", {"extraArgs": ["-tp", "2"]}, "spec.extraArgs", "tensorParallelSize"),
    ("owned flag later", {"extraArgs": ["--max-num-seqs", "4", "--port=9"]}, "spec.extraArgs", "set by the operator"),
    ("value first", {"extraArgs": ["4096"]}, "spec.extraArgs", "must start with a flag"),
    ("separator", {"extraArgs": ["--x", "--"]}, "spec.extraArgs", "'--'"),
    ("claim and size", {"cache": {"existingClaim": "c", "size": "10Gi"}}, "spec.cache.existingClaim", "must not be set"),
    ("claim and class", {"cache": {"existingClaim": "c", "storageClassName": "fast"}}, "spec.cache.existingClaim", "remove one side"),
    ("pvc model with size", {"model": "pvc://store/m", "cache": {"size": "5Gi"}}, "spec.cache", "pvc:// model"),
    ("shared replicas on RWO", {"replicas": 2, "cache": {"sharing": "Shared"}}, "spec.replicas", "sharing PerReplica"),
    ("shared autoscaling on RWO", {"autoscaling": {"maxReplicas": 3}, "cache": {"sharing": "Shared"}},
     "spec.autoscaling.maxReplicas", "ReadWriteMany"),
    ("per-replica on an existing claim", {"cache": {"sharing": "PerReplica", "existingClaim": "c"}}, "spec.cache.sharing",
     "existingClaim"),
    ("per-replica pvc model", {"model": "pvc://store/m", "cache": {"sharing": "PerReplica"}}, "spec.cache.sharing", "pvc://"),
    ("unknown sharing", {"cache": {"sharing": "Mirrored"}}, "spec.cache.sharing", "is not one of"),
    ("unknown rollout", {"rollout": {"strategy": "Recreate"}}, "spec.rollout.strategy", "is not one of"),
    ("pdb as words", {"podDisruptionBudget": {"maxUnavailable": "one"}}, "spec.podDisruptionBudget.maxUnavailable",
     "percentage"),
    ("gpu type and memory", {"gpu": {"type": "L4", "memory": "24Gi"}}, "spec.gpu", "exactly one"),
    ("gpu empty", {"gpu": {}}, "spec.gpu", "exactly one"),
    ("gpu unknown", {"gpu": {"type": "RTX4090"}}, "spec.gpu.type", "is not one of"),
    ("awq in float32", {"quantization": "awq", "dtype": "float32"}, "spec.dtype", "float16 or bfloat16"),
    ("mxfp4 in float16", {"quantization": "mxfp4", "dtype": "float16"}, "spec.dtype", "bfloat16"),
    ("fp_quant on L4", {"quantization": "fp_quant", "gpu": {"type": "L4"}}, "spec.quantization", "B200"),
    ("16-bit kv with float32", {"kvCacheDtype": "bfloat16", "dtype": "float32"}, "spec.kvCacheDtype", "16-bit"),
    ("unknown kv dtype", {"kvCacheDtype": "int2"}, "spec.kvCacheDtype", "is not one of"),
    ("model without org", {"model": "llama"}, "spec.model", "repo id"),
    ("model escaping its claim", {"model": "pvc://store/../etc"}, "spec.model", "'..'"),
    ("model from s3", {"model": "s3://bucket/model"}, "spec.model", "pvc://"),
    ("revision with space", {"revision": "main branch"}, "spec.revision", "may not contain spaces"),
    ("revision upper-case commit", {"revision": "7AE557604ADF67BE50417F59C2C2F167DEF9A775"}, "spec.revision", "lower-case"),
    ("token in env", {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "spec.env", "spec.hfTokenSecretRef"),
    ("owned env", {"env": [{"name": "HF_HUB_OFFLINE", "value": "0"}]}, "spec.env", "the operator sets them"),
    ("env value and valueFrom", {"env": [{"name": "A", "value": "1", "valueFrom": {}}]}, "spec.env", "not both"),
    ("env bad name", {"env": [{"name": "1 A", "value": "1"}]}, "spec.env", "C identifier"),
    ("gpus in resources", {"resources": {"limits": {"nvidia.com/gpu": 2}}}, "spec.resources", "tensorParallelSize"),
    ("bad quantity", {"resources": {"requests": {"memory": "lots"}}}, "spec.resources.requests.memory", ""),
    ("RWOP cache", {"cache": {"accessModes": ["ReadWriteOncePod"]}}, "spec.cache.accessModes", "ReadWriteOncePod"),
    ("read-only cache", {"cache": {"accessModes": ["ReadOnlyMany"]}}, "spec.cache.accessModes", "writable"),
    ("bad cache size", {"cache": {"size": "lots"}}, "spec.cache.size", "quantity"),
    ("bad delete policy", {"cache": {"deletePolicy": "Keep"}}, "spec.cache.deletePolicy", "is not one of"),
    ("token ref without name", {"hfTokenSecretRef": {"key": "t"}}, "spec.hfTokenSecretRef", "'name' is a required"),
    ("token ref bad name", {"hfTokenSecretRef": {"name": "HF_Token"}}, "spec.hfTokenSecretRef.name", "Secret"),
    ("served name with space", {"servedModelName": "my model"}, "spec.servedModelName", "whitespace"),
    ("misspelt field", {"quantisation": "awq"}, "spec.quantisation", "unknown field"),
    ("negative replicas", {"replicas": -1}, "spec.replicas", ""),
    ("unknown dtype", {"dtype": "fp16"}, "spec.dtype", "is not one of"),
    ("boolean as text", {"trustRemoteCode": "yes"}, "spec.trustRemoteCode", "is not of type"),
    ("unknown load format", {"loadFormat": "gguf"}, "spec.loadFormat", "is not one of"),
    ("negative seed", {"seed": -1}, "spec.seed", ""),
    # issue 10, section 5: inputs that reached a file path, a flag or a crash
    ("revision escaping refs/", {"revision": "main/../../../../x"}, "spec.revision", "no '..'"),
    ("revision '//'", {"revision": "a//b"}, "spec.revision", "'//'"),
    ("revision leading '/'", {"revision": "/etc"}, "spec.revision", "not starting"),
    ("revision trailing '/'", {"revision": "main/"}, "spec.revision", "not ending"),
    ("revision trailing '.'", {"revision": "main."}, "spec.revision", "not ending"),
    ("revision '.lock'", {"revision": "main.lock"}, "spec.revision", ".lock"),
    ("revision '.lock' part", {"revision": "a.lock/b"}, "spec.revision", ".lock"),
    ("revision hidden part", {"revision": "refs/.x"}, "spec.revision", "starts with '.'"),
    ("revision hidden", {"revision": ".git"}, "spec.revision", "starts with '.'"),
    ("revision '@'", {"revision": "@"}, "spec.revision", "not '@'"),
    ("revision '@{'", {"revision": "main@{1}"}, "spec.revision", "'@{'"),
    ("revision like a flag", {"revision": "-x"}, "spec.revision", "'-'"),
    ("revision '~'", {"revision": "main~1"}, "spec.revision", "~ ^ :"),
    ("revision '^'", {"revision": "main^"}, "spec.revision", "~ ^ :"),
    ("revision ':'", {"revision": "a:b"}, "spec.revision", "~ ^ :"),
    ("revision '?'", {"revision": "a?"}, "spec.revision", "~ ^ :"),
    ("revision '*'", {"revision": "a*"}, "spec.revision", "~ ^ :"),
    ("revision '['", {"revision": "a[0]"}, "spec.revision", "~ ^ :"),
    ("revision backslash", {"revision": "a\\b"}, "spec.revision", "~ ^ :"),
    ("revision tab", {"revision": "a\tb"}, "spec.revision", "control characters"),
    ("revision DEL", {"revision": "a\x7fb"}, "spec.revision", "control characters"),
    ("revision newline", {"revision": "main\n"}, "spec.revision", "control characters"),
    ("pvc path '..'", {"model": "pvc://claim/../../etc"}, "spec.model", "'..' segment"),
    ("pvc path ending '..'", {"model": "pvc://claim/a/.."}, "spec.model", "'..' segment"),
    ("pvc path '.'", {"model": "pvc://claim/./x"}, "spec.model", "'.' or '..'"),
    ("pvc claim upper-case", {"model": "pvc://Claim/x"}, "spec.model", "PersistentVolumeClaim's name"),
    ("pvc claim missing", {"model": "pvc:///x"}, "spec.model", "PersistentVolumeClaim's name"),
    ("repo id '--'", {"model": "a--b/c"}, "spec.model", "without '--'"),
    ("repo id ends with '-'", {"model": "org/name-"}, "spec.model", "ending with a letter or digit"),
    ("repo id ends with '.'", {"model": "org/name."}, "spec.model", "ending with a letter or digit"),
    ("repo id starts with '-'", {"model": "-org/name"}, "spec.model", "starting and ending"),
    ("repo id starts with '.'", {"model": ".org/name"}, "spec.model", "starting and ending"),
    ("repo name of 97", {"model": "org/" + "a" * 97}, "spec.model", "1 to 96"),
    ("repo org of 97", {"model": "o" * 97 + "/name"}, "spec.model", "1 to 96"),
    ("repo id '.git'", {"model": "org/name.git"}, "spec.model", ".git"),
    ("repo id '..'", {"model": "org..x/name"}, "spec.model", "'..'"),
    ("repo id with two '/'", {"model": "datasets/org/name"}, "spec.model", "repo id"),
    ("repo id with a space", {"model": "org/na me"}, "spec.model", "repo id"),
    ("repo id not ASCII", {"model": "org/caf\u00e9"}, "spec.model", "repo id"),
    ("extra -qfp8", {"extraArgs": ["-qfp8"]}, "spec.extraArgs", "-qfp8"),
    ("extra -q=awq", {"extraArgs": ["-q=awq"]}, "spec.extraArgs", "a short form"),
    ("extra --max-model-le", {"extraArgs": ["--max-model-le", "131072"]}, "spec.extraArgs", "abbreviation"),
    ("extra --tensor-parallel-siz=8", {"extraArgs": ["--tensor-parallel-siz=8"]}, "spec.extraArgs", "tensorParallelSize"),
    ("extra -tp8", {"extraArgs": ["-tp8"]}, "spec.extraArgs", "tensorParallelSize"),
    ("extra -t 2", {"extraArgs": ["-t", "2"]}, "spec.extraArgs", "tensorParallelSize"),
    ("extra --trust-remote-cod", {"extraArgs": ["--trust-remote-cod"]}, "spec.extraArgs", "trustRemoteCode"),
    ("extra --revisio X", {"extraArgs": ["--revisio", "X"]}, "spec.extraArgs", "model/revision"),
    ("extra --no-enforce-eager", {"extraArgs": ["--no-enforce-eager"]}, "spec.extraArgs", "--no-<flag>"),
    ("extra --no-trust-remote-code", {"extraArgs": ["--no-trust_remote_code"]}, "spec.extraArgs", "trustRemoteCode"),
    ("extra --download_di", {"extraArgs": ["--download_di=/tmp"]}, "spec.extraArgs", "--download-dir"),
    ("extra --served-model", {"extraArgs": ["--served-model", "x"]}, "spec.extraArgs", "servedModelName"),
    ("extra --tokenizer-rev", {"extraArgs": ["--tokenizer-rev", "x"]}, "spec.extraArgs", "--tokenizer-revision"),
    ("extra --ho", {"extraArgs": ["--max-num-seqs", "4", "--ho=0.0.0.0"]}, "spec.extraArgs[2]", "--host"),
    ("extra a list", {"extraArgs": [[1, 2]]}, "spec.extraArgs[0]", "is not of type 'string'"),
    ("extra a number", {"extraArgs": ["--max-num-seqs", 4]}, "spec.extraArgs[1]", "is not of type 'string'"),
    ("served name like a flag", {"servedModelName": "-chat"}, "spec.servedModelName", "may not start with '-'"),
    ("served name an owned flag", {"servedModelName": "--port"}, "spec.servedModelName", "read it as a flag"),
    ("resource claims", {"resources": {"claims": [{"name": "gpu"}]}}, "spec.resources.claims", "not supported yet"),
]


@pytest.mark.parametrize(("case", "spec", "field", "words"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_refused_naming_the_field(case: str, spec: dict[str, Any], field: str, words: str) -> None:
    errors = cel_eval.validate(vllm_model(**spec))
    assert errors, f"{case}: accepted"
    naming = [e for e in errors if e.startswith(field + ":") or e.startswith(field + "[") or f" {field}" in e]
    assert naming, f"{case}: no message names {field}: {errors}"
    assert any(words in e for e in naming), f"{case}: no message says {words!r}: {naming}"


def test_at_least_100_bad_specs() -> None:
    assert len(BAD_SPECS) >= 100


@pytest.mark.parametrize(
    ("name", "ok"), [("qwen-chat", True), ("a" * 48, True), ("a" * 49, False), ("9lives", False), ("Qwen", False)]
)
def test_metadata_name_fits_child_names(name: str, ok: bool) -> None:
    body = vllm_model()
    body["metadata"]["name"] = name
    errors = cel_eval.validate(body)
    assert (errors == []) is ok, errors
    if not ok:
        assert all("metadata.name" in e for e in errors)


def test_missing_model_is_refused() -> None:
    body = vllm_model()
    del body["spec"]["model"]
    assert any("'model' is a required property" in e for e in cel_eval.validate(body))


# --- the owned-flags rule and vllm_args never drift apart -----------------------------------------------


def test_crd_carries_the_generated_owned_flag_rule() -> None:
    item_rules = crd.spec_schema()["properties"]["extraArgs"]["items"]["x-kubernetes-validations"]
    assert [r["rule"] for r in item_rules] == [vllm_args.cel_owned_flag_rule()], (
        "crds/vllmmodel.yaml is stale: paste vllm_runtime.vllm_args.cel_owned_flag_rule() into the extraArgs item rule"
    )


# (one extraArgs item, refused?): what vLLM's parser would take for an owned flag, and look-alikes it would not.
EXTRA_ARG_CASES: list[tuple[str, bool]] = [
    *((flag, True) for flag in sorted(vllm_args.OWNED_FLAGS)),
    *((f"{flag}=1", True) for flag in sorted(vllm_args.OWNED_FLAGS)),
    *(("--" + flag[2:].replace("-", "_"), True) for flag in sorted(vllm_args.OWNED_FLAGS)),
    *((flag[:-1], True) for flag in sorted(vllm_args.OWNED_FLAGS)),  # abbreviations
    *((short, True) for short in sorted(vllm_args.OWNED_SHORT_FLAGS)),
    ("-qfp8", True), ("-q=awq", True), ("-tp=8", True), ("-tp8", True), ("-t", True), ("-t=2", True),
    ("--max-model-le", True), ("--tensor-parallel-siz=8", True), ("--trust-remote-cod", True), ("--revisio", True),
    ("--no-enforce-eager", True), ("--no-enforce", True), ("--no_trust_remote_code", True), ("--max_model_le=5", True),
    ("--mod", True), ("--por=1", True), ("--h", True), ("--tokenizer-", True), ("--tokenizer_rev=x", True),
    ("--max-num-seqs", False), ("--max-num-seqs=8", False), ("--model-loader-extra-config", False),
    ("--enable-prefix-caching", False), ("--no-enable-prefix-caching", False), ("--dtype-foo", False),
    ("--tokenizer", False), ("--tokenizer=org/tok", False), ("--tokenizer-mode", False), ("--seed-x", False),
    ("--hf-overrides", False), ("--port-x=1", False), ("-O3", False), ("-pp", False), ("-dp=2", False),
    ("-ep", False), ("8", False), ("{}", False), ("-", False), ("--", False), ("x--model", False),
]


@pytest.mark.parametrize(("arg", "refused"), EXTRA_ARG_CASES, ids=[a for a, _ in EXTRA_ARG_CASES])
def test_cel_and_check_extra_args_agree(arg: str, refused: bool) -> None:
    try:
        vllm_args.check_extra_args([arg])
        python_refused = False
    except vllm_args.OwnedFlagError as exc:
        python_refused = True
        assert exc.field == "spec.extraArgs" and exc.found[0][0] == arg
    cel_errors = [e for e in cel_eval.validate(vllm_model(extraArgs=["--max-num-seqs", "1", arg])) if "operator sets" in e]
    assert (python_refused, bool(cel_errors)) == (refused, refused)
    if refused:
        assert cel_errors[0].startswith("spec.extraArgs[2]: ")


# --- enums follow the vLLM the runtime image pins ----------------------------------------------------------


def test_enums_match_vllm() -> None:
    quantization = pytest.importorskip("vllm.model_executor.layers.quantization")
    cache_config = pytest.importorskip("vllm.config.cache")
    model_config = pytest.importorskip("vllm.config.model")
    props = crd.spec_schema()["properties"]
    assert set(props["quantization"]["enum"]) == set(quantization.QUANTIZATION_METHODS)
    assert "squeezellm" not in quantization.QUANTIZATION_METHODS
    assert set(props["kvCacheDtype"]["enum"]) == set(typing.get_args(cache_config.CacheDType))
    assert set(props["dtype"]["enum"]) == set(typing.get_args(model_config.ModelDType))


def test_validation_does_not_modify_its_input() -> None:
    body = vllm_model(quantization="awq")
    before = copy.deepcopy(body)
    cel_eval.validate(body)
    assert body == before


def test_wheel_carries_the_crd_and_the_installed_package_reads_it(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("hatchling")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "vllm_operator" / "crds" / "vllmmodel.yaml").read_text() == (ROOT / "crds" / "vllmmodel.yaml").read_text()
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from vllm_operator import crd; print(crd.crd_path())", str(site)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(site / "vllm_operator" / "crds" / "vllmmodel.yaml")
