"""vLLM's LoRA flags (--enable-lora, --max-loras, --max-lora-rank, --max-cpu-loras) belong to ``vllm-runtime serve
--adapters-file``, so with ``spec.adapters`` neither serve nor the CRD lets ``spec.extraArgs`` reach them, in any
spelling vLLM's parser accepts: the rules of the owned flags (``vllm_args.owned_flag_of``). tests/test_validation.py
checks the same against vLLM's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cel_eval
from vllm_operator import crd
from vllm_runtime import serve, summary, vllm_args
from vllm_runtime.adapters.settings import LoraSettings

# (argument, the LoRA flag vLLM's parser takes it for, or None)
LORA_ARG_CASES: list[tuple[str, str | None]] = [
    *((flag, flag) for flag in (vllm_args.ENABLE_LORA_FLAG, *vllm_args.LORA_FLAGS.values())),
    ("--enable_lora", "--enable-lora"), ("--max_loras=8", "--max-loras"), ("--max-cpu-loras=64", "--max-cpu-loras"),
    ("--max-lora-r", "--max-lora-rank"), ("--max-lora-r=64", "--max-lora-rank"), ("--max_lora_ra", "--max-lora-rank"),
    ("--max-cpu-l", "--max-cpu-loras"), ("--max-c", "--max-cpu-loras"), ("--enable-lo", "--enable-lora"),
    ("--max-lora-rank.x", "--max-lora-rank"), ("--max-loras.x=1", "--max-loras"), ("--enable-lora.x", "--enable-lora"),
    ("--no-enable-lora", "--enable-lora"), ("--no_enable_lora", "--enable-lora"), ("--no-enable-lo", "--enable-lora"),
    # a prefix of several flags: vLLM refuses it as ambiguous, so it is refused (named by one of them)
    ("--max-lora", "--max-lora-rank"), ("--max-lora-", "--max-lora-rank"), ("--max-", "--max-cpu-loras"),
    # look-alikes vLLM takes for other flags
    ("--max-lora-c", None), ("--max-lora-cls-labels", None), ("--enable-lora-bias", None), ("--lora-modules", None),
    ("--max-num-seqs", None), ("--enable-prefix-caching", None), ("--no-enable-prefix-caching", None),
    ("--tokenizer", None), ("--max-loras-x", None), ("-", None), ("--", None), ("--.x", None), ("8", None),
    ("x--max-loras", None), ("-max-loras", None),
]


@pytest.mark.parametrize(("arg", "flag"), LORA_ARG_CASES, ids=[a for a, _ in LORA_ARG_CASES])
def test_lora_flag_of_follows_vllms_parser(arg: str, flag: str | None) -> None:
    assert vllm_args.lora_flag_of(arg) == flag
    assert vllm_args.lora_flags_in(["--max-num-seqs", "4", arg]) == ([(arg, flag)] if flag else [])


def test_lora_flags_in_names_each_argument_as_given() -> None:
    args = ["--max-lora-r", "64", "--no-enable-lora", "--max-num-seqs", "4", "--max_cpu_loras=8"]
    assert vllm_args.lora_flags_in(args) == [
        ("--max-lora-r", "--max-lora-rank"), ("--no-enable-lora", "--enable-lora"), ("--max_cpu_loras=8", "--max-cpu-loras")
    ]  # fmt: skip
    assert vllm_args.lora_flags_in(vllm_args.vllm_flags({"maxModelLen": 4096, "extraArgs": ["--max-num-seqs", "4"]})) == []


# --- serve --adapters-file ------------------------------------------------------------------------------------


def _plan(tmp_path: Path, extra: list[str]) -> serve.ServePlan:
    return serve.build_plan(
        model="org/m", revision="a" * 40, cache_dir=tmp_path, host="0.0.0.0", port=8000, extra_args=extra,
        vllm_version="0.32.0", accelerator="cpu", base_env={},
        lora=LoraSettings(max_loras=4, max_lora_rank=16, max_cpu_loras=32),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("arg", "named"),
    [("--max-loras", "--max-loras"), ("--max-lora-r", "'--max-lora-r' = --max-lora-rank"),
     ("--max-cpu-l=8", "'--max-cpu-l=8' = --max-cpu-loras"), ("--max-lora-rank.x", "'--max-lora-rank.x' = --max-lora-rank"),
     ("--no-enable-lora", "'--no-enable-lora' = --enable-lora"), ("--max-lora", "'--max-lora' = --max-lora-rank")],
)  # fmt: skip
def test_serve_with_adapters_refuses_lora_flags_in_any_spelling(tmp_path: Path, arg: str, named: str) -> None:
    with pytest.raises(serve.ServeError) as err:
        _plan(tmp_path, ["--max-num-seqs", "4", arg, "64"])
    assert err.value.reason == "InvalidArgs" and err.value.exit_code == summary.EXIT_USAGE
    assert f"may not set {named} with --adapters-file" in err.value.message


def test_serve_with_adapters_passes_look_alikes_through(tmp_path: Path) -> None:
    with pytest.raises(serve.ServeError) as err:  # past the LoRA check: the (empty) cache is next
        _plan(tmp_path, ["--max-lora-cls-labels", "4", "--lora-modules", "a=/x", "--enable-prefix-caching"])
    assert err.value.reason != "InvalidArgs"


# --- the CRD ---------------------------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    return [r for r in crd.spec_schema()["x-kubernetes-validations"] if r.get("fieldPath") == ".extraArgs"]


def test_crd_carries_the_generated_lora_flag_rule() -> None:
    assert [r["rule"] for r in _rules()] == [vllm_args.cel_lora_flag_rule()], (
        "crds/vllmmodel.yaml is stale: paste vllm_runtime.vllm_args.cel_lora_flag_rule() into the spec rule on .extraArgs"
    )


def _model(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"model": "org/m", **spec}}  # fmt: skip


@pytest.mark.parametrize(("arg", "flag"), LORA_ARG_CASES, ids=[a for a, _ in LORA_ARG_CASES])
def test_cel_and_lora_flag_of_agree(arg: str, flag: str | None) -> None:
    def lora_errors(**spec: Any) -> list[str]:
        return [e for e in cel_eval.validate(_model(**spec)) if "LoRA flags" in e]

    errors = lora_errors(adapters=[{"name": "sql", "model": "org/sql-lora"}], extraArgs=["--max-num-seqs", "1", arg])
    assert bool(errors) == (flag is not None), errors
    if errors:
        assert errors[0].startswith("spec.extraArgs: ")
    assert lora_errors(extraArgs=["--max-num-seqs", "1", arg]) == []  # without spec.adapters, LoRA flags are the user's
    assert lora_errors(adapters=[]) == []
