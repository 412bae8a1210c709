"""The release workflow (.github/workflows/release.yml) cannot run here: it is linted (actionlint, zizmor offline),
and what it pushes is checked against what the chart pulls by default."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_render import CHART, ROOT, one

WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
BAD_WORKFLOW = """\
name: bad
on: pull_request_target
jobs:
  greet:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}"
"""


def _workflow(path: Path = RELEASE) -> dict[Any, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(__file__).parent.parent / ".venv" / "bin"))
    if found is None:
        pytest.fail(f"{name} is in the test extras: pip install -e '.[test]'")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_actionlint_passes_on_the_workflows_and_catches_a_bad_one(tmp_path: Path) -> None:
    workflows = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(workflows) >= 2  # release and ci
    result = _run(_tool("actionlint"), *workflows)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_WORKFLOW.replace("runs-on:", "runs_on:"))
    assert _run(_tool("actionlint"), str(bad)).returncode != 0, "actionlint ran on nothing"


def test_zizmor_offline_finds_nothing_even_pedantic_and_catches_an_injection(tmp_path: Path) -> None:
    result = _run(_tool("zizmor"), "--offline", "--persona=pedantic", str(WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(BAD_WORKFLOW)
    bad = _run(_tool("zizmor"), "--offline", str(tmp_path / ".github" / "workflows"))
    assert bad.returncode != 0 and "template-injection" in bad.stdout + bad.stderr


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_every_action_is_pinned_by_commit_and_permissions_start_empty(path: Path) -> None:
    workflow = _workflow(path)
    assert workflow["permissions"] == {}, "grant rights per job, none by default"
    text = path.read_text()
    for step in _steps(workflow):
        if "uses" in step:
            assert PINNED.match(step["uses"]), f"{path.name}: pin {step['uses']} by its full commit SHA"
            assert re.search(re.escape(step["uses"]) + r"\s+# v\d", text), f"{step['uses']}: say the version it is"
        if "run" in step:
            assert "${{" not in step["run"], f"{path.name}: pass expressions to run: through env (injection)"
    for name, job in workflow["jobs"].items():
        assert "permissions" in job, f"{path.name}: job {name} states its permissions"
        if job["permissions"].get("id-token") == "write":
            assert any("cosign" in str(s.get("run", "")) for s in job["steps"]), "id-token only where it signs"


def test_release_builds_both_images_signed_with_provenance_and_sbom() -> None:
    workflow = _workflow()
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as True
    job = workflow["jobs"]["image"]
    components = {entry["component"]: entry["platforms"].split(",") for entry in job["strategy"]["matrix"]["include"]}
    assert set(components) == {"operator", "runtime"}
    assert {"linux/amd64", "linux/arm64"} <= set(components["operator"]), "the operator is multi-arch"
    assert "linux/amd64" in components["runtime"]
    (build,) = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    options = build["with"]
    assert options["push"] is True and options["context"] == "."
    assert options["provenance"] == "mode=max" and options["sbom"] is True
    assert options["file"] == "${{ matrix.component }}/Dockerfile"
    for component in components:
        assert (ROOT / component / "Dockerfile").exists()
    assert any(s.get("uses", "").startswith("docker/setup-qemu-action@") for s in job["steps"])
    (sign,) = [s for s in job["steps"] if "cosign sign" in str(s.get("run", ""))]
    assert "--yes" in sign["run"] and "@${DIGEST}" in sign["run"], "sign keyless, by digest (a tag can move)"
    assert sign["env"]["DIGEST"] == "${{ steps." + build["id"] + ".outputs.digest }}"
    assert job["permissions"] == {"contents": "read", "packages": "write", "id-token": "write"}


def test_tag_to_version_step_accepts_the_projects_versions_only(tmp_path: Path) -> None:
    (step,) = [s for s in _workflow()["jobs"]["version"]["steps"] if s.get("id") == "version"]
    output = tmp_path / "out"

    def version_of(tag: str) -> subprocess.CompletedProcess[str]:
        output.write_text("")
        env = {"TAG": tag, "GITHUB_OUTPUT": str(output), "PATH": "/usr/bin:/bin"}
        return subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=30)

    assert version_of("v1.2.3").returncode == 0 and output.read_text() == "version=1.2.3\n"
    assert version_of("v1.2.3-rc.1").returncode == 0 and output.read_text() == "version=1.2.3-rc.1\n"
    for bad in ("1.2.3", "v1.2", "vlatest", "v1.2.3;rm"):
        assert version_of(bad).returncode != 0, bad


def test_the_chart_pulls_by_default_exactly_what_the_release_pushes(tmp_path: Path) -> None:
    """The workflow pushes <REGISTRY>/<component>:<version> and packages the chart with appVersion = version; the
    chart's image tags default to appVersion, so a released chart pulls the images released with it."""
    import helm_python as helm

    workflow = _workflow()
    registry = workflow["env"]["REGISTRY"]
    (build,) = [s for s in workflow["jobs"]["image"]["steps"] if s.get("id") == "build"]
    assert build["with"]["tags"] == "${{ env.REGISTRY }}/${{ matrix.component }}:${{ needs.version.outputs.version }}"
    (package,) = [s for s in _steps(workflow) if "helm package" in str(s.get("run", ""))]
    assert '--version "$VERSION" --app-version "$VERSION"' in package["run"]
    (push,) = [s for s in _steps(workflow) if "helm push" in str(s.get("run", ""))]
    assert '"oci://${REGISTRY}/charts"' in push["run"]

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == f"{registry}/operator" and values["image"]["tag"] == ""
    assert values["runtimeImage"]["repository"] == f"{registry}/runtime" and values["runtimeImage"]["tag"] == ""
    # What `helm package --version 9.8.7 --app-version 9.8.7` produces, rendered.
    released = tmp_path / "vllm-operator"
    shutil.copytree(CHART, released)
    chart = yaml.safe_load((released / "Chart.yaml").read_text())
    (released / "Chart.yaml").write_text(yaml.safe_dump({**chart, "version": "9.8.7", "appVersion": "9.8.7"}))
    with helm.Chart.load(released) as loaded:
        rendered = loaded.render({}, name="vo", namespace="vllm-system")
    objects = [doc for path, text in rendered.items() if not path.endswith(".txt") for doc in yaml.safe_load_all(text)]
    container = one([o for o in objects if o], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{registry}/operator:9.8.7"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_OPERATOR_RUNTIME_IMAGE"] == f"{registry}/runtime:9.8.7"


def test_readme_installs_the_released_chart_and_builds_the_images() -> None:
    readme = (ROOT / "README.md").read_text()
    registry = _workflow()["env"]["REGISTRY"]
    assert f"oci://{registry}/charts/vllm-operator --version" in readme
    for component in ("operator", "runtime"):
        assert f"docker build -f {component}/Dockerfile" in readme
