"""spec.adapters in the CRD: good specs accepted, bad ones refused naming the field (through
``vllm_operator.validation``, the API server's stand-in), and the adapter's model/revision rules kept the same
expressions as spec.model's and spec.revision's."""

from __future__ import annotations

from typing import Any

import pytest

import cel_eval
from vllm_operator import crd


def vllm_model(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"model": "Qwen/Qwen2.5-0.5B-Instruct", **spec},
    }


def adapter(name: str = "sql", model: str = "org/sql-lora", **more: Any) -> dict[str, Any]:
    return {"name": name, "model": model, **more}


GOOD = [
    ("two adapters", {"adapters": [adapter(), adapter("chat", "org/chat-lora", revision="v1")]}),
    ("an empty list enables LoRA", {"adapters": []}),
    ("a pinned commit", {"adapters": [adapter(revision="a" * 40)]}),
    ("limits", {"adapters": [adapter()], "maxLoras": 8, "maxLoraRank": 64, "maxCpuLoras": 8}),
    ("name equal to another model's id", {"servedModelName": "chat", "adapters": [adapter("Qwen/Qwen2.5-0.5B-Instruct")]}),
    ("pvc model with a claim for the adapters", {"model": "pvc://store/m", "cache": {"existingClaim": "c"},
                                                "adapters": [adapter()]}),
    ("pvc model with adapters on its volume", {"model": "pvc://store/m", "adapters": [adapter(model="pvc://store/a")]}),
]

BAD = [
    ("duplicate names", {"adapters": [adapter(), adapter(model="org/other")]}, "spec.adapters", "must be unique"),
    ("the base model's id", {"adapters": [adapter("Qwen/Qwen2.5-0.5B-Instruct")]}, "spec.adapters", "base model"),
    ("the served name", {"servedModelName": "chat", "adapters": [adapter("chat")]}, "spec.adapters", "base model"),
    ("a name like a flag", {"adapters": [adapter("-x")]}, "spec.adapters[0].name", "start with a letter"),
    ("a name with a space", {"adapters": [adapter("a b")]}, "spec.adapters[0].name", "only letters"),
    ("no model", {"adapters": [{"name": "a"}]}, "spec.adapters[0]", "model"),
    ("a repo id with --", {"adapters": [adapter(model="org/a--b")]}, "spec.adapters[0].model", "repo id"),
    ("a repo id without org", {"adapters": [adapter(model="sql-lora")]}, "spec.adapters[0].model", "repo id"),
    ("a .git repo", {"adapters": [adapter(model="org/a.git")]}, "spec.adapters[0].model", "'.git'"),
    ("a bad claim", {"adapters": [adapter(model="pvc://Bad_Claim/a")]}, "spec.adapters[0].model", "<claim>"),
    ("a pvc path escaping", {"adapters": [adapter(model="pvc://store/../x")]}, "spec.adapters[0].model", "'..'"),
    ("a revision with a space", {"adapters": [adapter(revision="a b")]}, "spec.adapters[0].revision", "spaces"),
    ("a revision with ..", {"adapters": [adapter(revision="a..b")]}, "spec.adapters[0].revision", "branch or tag"),
    ("a revision like a flag", {"adapters": [adapter(revision="-x")]}, "spec.adapters[0].revision", "branch or tag"),
    ("an upper-case commit", {"adapters": [adapter(revision="A" * 40)]}, "spec.adapters[0].revision", "upper case"),
    ("an empty revision", {"adapters": [adapter(revision="")]}, "spec.adapters[0].revision", "non-empty"),
    ("Hub adapter without a cache", {"model": "pvc://store/m", "adapters": [adapter()]}, "spec.adapters", "existingClaim"),
    ("rank not one vLLM takes", {"adapters": [], "maxLoraRank": 12}, "spec.maxLoraRank", "is not one of"),
    ("zero loras", {"adapters": [], "maxLoras": 0}, "spec.maxLoras", "minimum"),
    ("cpu loras below loras", {"adapters": [], "maxLoras": 8, "maxCpuLoras": 4}, "spec.maxCpuLoras", "at least"),
    ("cpu loras below the default", {"adapters": [], "maxCpuLoras": 2}, "spec.maxCpuLoras", "default 4"),
    ("too many adapters", {"adapters": [adapter(f"a{i}") for i in range(33)]}, "spec.adapters", "too long"),
]


@pytest.mark.parametrize(("case", "spec"), GOOD, ids=[c for c, _ in GOOD])
def test_good_adapter_specs_are_accepted(case: str, spec: dict[str, Any]) -> None:
    assert cel_eval.validate(vllm_model(**spec)) == [], case


@pytest.mark.parametrize(("case", "spec", "field", "words"), BAD, ids=[c[0] for c in BAD])
def test_bad_adapter_spec_is_refused_naming_the_field(case: str, spec: dict[str, Any], field: str, words: str) -> None:
    errors = cel_eval.validate(vllm_model(**spec))
    naming = [e for e in errors if e.startswith(field + ":") or e.startswith(field + ".") or f" {field}" in e]
    assert naming, f"{case}: no message names {field}: {errors}"
    assert any(words in e for e in naming), f"{case}: no message says {words!r}: {naming}"


def test_adapter_model_and_revision_rules_are_spec_models_rules() -> None:
    props = crd.spec_schema()["properties"]
    item = props["adapters"]["items"]["properties"]
    for field in ("model", "revision"):
        ours = [r["rule"] for r in item[field]["x-kubernetes-validations"]]
        assert ours == [r["rule"] for r in props[field]["x-kubernetes-validations"]], field
        for key in ("minLength", "maxLength", "default"):
            assert item[field].get(key) == props[field].get(key), (field, key)


def test_revision_defaults_to_main_per_adapter() -> None:
    spec = crd.apply_defaults({"model": "org/m", "adapters": [adapter()]})
    assert spec["adapters"][0]["revision"] == "main"
