"""Bad input refused: by ``vllm-operator render`` (through its CLI), by the CRD's rules against the
libraries whose rules they mirror (git, huggingface_hub, vLLM's own argument parser), and by serve.

``render`` validates with ``vllm_operator.validation``, the code tests/test_crd.py judges the CRD with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from celpy import celtypes

from vllm_operator import cli, crd, inputs, validation
from vllm_runtime import layout, serve, vllm_args

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HEADER = f"apiVersion: {crd.API_VERSION}\nkind: {crd.KIND}\nmetadata: {{name: m}}\n"


def model_yaml(spec: str) -> str:
    return HEADER + f"spec: {spec}\n"


def run_render(capsys: pytest.CaptureFixture[str], *files: str) -> tuple[int, str, str]:
    code = cli.main(["render", *(a for f in files for a in ("-f", f))])
    out, err = capsys.readouterr()
    return code, out, err


def deep_flow(depth: int) -> str:
    return model_yaml("{model: o/n, affinity: {x: " + "[" * depth + "]" * depth + "}}")


def deep_block(depth: int) -> str:
    lines = [HEADER + "spec:\n  model: o/n\n  affinity:"]
    lines += [" " * (2 * level + 4) + "a:" for level in range(depth)]
    return "\n".join(lines) + " 1\n"


# (case, file content, what the error must name) — each refused by `render` with exit code 1.
BAD_RENDER_INPUTS: list[tuple[str, str | bytes, str]] = [
    ("wrong version", model_yaml("{model: o/n}").replace("v1alpha1", "v1"), "apiVersion"),
    ("core group", model_yaml("{model: o/n}").replace(crd.API_VERSION, "v1"), "apiVersion"),
    ("wrong kind in the group", model_yaml("{model: o/n}").replace("kind: VLLMModel", "kind: VLLMModle"), "kind"),
    ("no kind", model_yaml("{model: o/n}").replace("kind: VLLMModel\n", ""), "apiVersion and kind"),
    ("no apiVersion", model_yaml("{model: o/n}").replace(f"apiVersion: {crd.API_VERSION}\n", ""), "apiVersion and kind"),
    ("apiVersion a list", model_yaml("{model: o/n}").replace(crd.API_VERSION, "[1]"), "apiVersion and kind"),
    ("a list document", "- 1\n- 2\n", "not a mapping"),
    ("a string spec", model_yaml("just-a-string"), "spec"),
    ("a null spec", HEADER + "spec:\n", "'spec' is a required property"),
    ("no spec", HEADER, "'spec' is a required property"),
    ("extraArgs [[1,2]]", model_yaml("{model: o/n, extraArgs: [[1, 2]]}"), "spec.extraArgs[0]"),
    ("extraArgs a mapping", model_yaml("{model: o/n, extraArgs: {a: 1}}"), "spec.extraArgs"),
    ("extraArgs abbreviation", model_yaml("{model: o/n, extraArgs: [--max-model-le, '131072']}"), "spec.extraArgs[0]"),
    ("extraArgs glued short flag", model_yaml("{model: o/n, extraArgs: [-qfp8]}"), "spec.extraArgs[0]"),
    ("revision escaping", model_yaml("{model: o/n, revision: main/../../../../x}"), "spec.revision"),
    ("pvc path escaping", model_yaml("{model: 'pvc://claim/../../etc'}"), "spec.model"),
    ("repo id '--'", model_yaml("{model: a--b/c}"), "spec.model"),
    ("served name a flag", model_yaml("{model: o/n, servedModelName: --port}"), "spec.servedModelName"),
    ("resource claims", model_yaml("{model: o/n, resources: {claims: [{name: gpu}]}}"), "spec.resources.claims"),
    ("replicas a string", model_yaml("{model: o/n, replicas: many}"), "spec.replicas"),
    ("unknown field", model_yaml("{model: o/n, modle: x}"), "spec.modle"),
    ("no name", HEADER.replace("metadata: {name: m}\n", "metadata: {}\n") + "spec: {model: o/n}\n", "metadata.name"),
    ("no metadata", HEADER.replace("metadata: {name: m}\n", "") + "spec: {model: o/n}\n", "metadata.name"),
    ("name a date", model_yaml("{model: o/n}").replace("{name: m}", "{name: 2024-01-01}"), "metadata.name"),
    ("bad namespace", model_yaml("{model: o/n}").replace("{name: m}", "{name: m, namespace: Team_A}"), "metadata.namespace"),
    ("label a number", model_yaml("{model: o/n}").replace("{name: m}", "{name: m, labels: {tier: 1}}"), "metadata.labels"),
    ("5,000-deep flow nesting", deep_flow(5000), "nested more than 64 levels"),
    ("200-deep block nesting", deep_block(200), "nested more than 64 levels"),
    ("65-deep nesting", deep_flow(62), "nested more than 64 levels"),
    ("an alias", HEADER + "spec: &s {model: o/n}\nstatus: *s\n", "alias *s"),
    ("a merge key", "base: &b {model: o/n}\n---\n" + HEADER + "spec:\n  <<: *b\n", "alias *b"),
    ("billion laughs", HEADER + "spec: {model: o/n}\nx: &a [1, 1]\ny: &b [*a, *a]\nz: [*b, *b]\n", "alias *a"),
    ("duplicate model", HEADER + "spec:\n  model: o/n\n  revision: main\n  model: evil/model\n", "'model' twice"),
    ("a list as a key", HEADER + "spec: {model: o/n}\n? [a]\n: 1\n", "as a key"),
    ("binary model", model_yaml("{model: !!binary aGVsbG8=}"), "spec.model"),
    ("a set", model_yaml("{model: o/n, env: !!set {a}}"), "spec.env"),
    ("not a number", model_yaml("{model: o/n, gpuMemoryUtilization: .nan}"), "spec.gpuMemoryUtilization"),
    ("infinity", model_yaml("{model: o/n, replicas: .inf}"), "spec.replicas"),
    ("an integer of 5,000 digits", model_yaml("{model: o/n, seed: " + "9" * 5000 + "}"), "not valid YAML"),
    ("not UTF-8", model_yaml("{model: o/n}").encode() + b"# \xff\xfe\n", "not UTF-8"),
    ("broken YAML", HEADER + "spec: {model: [\n", "not valid YAML"),
    ("one bad of two", model_yaml("{model: o/n}") + "---\n" + model_yaml("{model: llama}"), "document 2"),
]


@pytest.mark.parametrize(("case", "content", "named"), BAD_RENDER_INPUTS, ids=[c for c, _, _ in BAD_RENDER_INPUTS])
def test_render_refuses_bad_input_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, content: str | bytes, named: str
) -> None:
    path = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, out, err = run_render(capsys, str(path))
    assert (code, out) == (1, ""), f"{case}: {err}"
    assert named in err, f"{case}: {err}"
    assert str(path) in err and "Traceback" not in err


def test_every_field_is_named_not_only_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.yaml").write_text(model_yaml("{model: 'pvc://c/../x', revision: a..b, extraArgs: [--revisio, x]}"))
    code, _, err = run_render(capsys, str(tmp_path / "m.yaml"))
    assert code == 1
    assert re.findall(r"^  (spec\.[\w.\[\]]+):", err, re.M) == ["spec.model", "spec.revision", "spec.extraArgs[0]"]


def test_other_kinds_are_skipped_and_good_models_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n" + (EXAMPLES / "01-small-hub-model.yaml").read_text()
    (tmp_path / "ok.yaml").write_text(text)
    code, out, err = run_render(capsys, str(tmp_path / "ok.yaml"))
    assert code == 0, err
    assert "kind: Deployment" in out and "kind: Secret" not in out


def test_no_anchor_or_alias_reaches_the_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_render(capsys, str(EXAMPLES))
    assert code == 0
    events = list(yaml.parse(out))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None)]


def test_a_50_mb_file_is_refused_by_its_size_without_being_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:  # sparse: 50 MB that cost no disk
        f.write(model_yaml("{model: o/n}").encode())
        f.truncate(50 * 1024 * 1024)
    reads: list[Path] = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or original(self))
    code, out, err = run_render(capsys, str(path))
    assert (code, out) == (1, "") and "larger than 2 MiB" in err and "Traceback" not in err
    assert reads == []


class EndlessStdin(io.TextIOBase):
    """A stdin that never ends: reading it all would never finish."""

    def __init__(self) -> None:
        self.chars_read = 0

    def read(self, size: int | None = -1) -> str:
        if size is None or size < 0:
            raise AssertionError("read stdin without a bound")
        self.chars_read += size
        return ("# padding line\n" * (size // 15 + 1))[:size]


def test_endless_stdin_is_read_only_up_to_the_limit(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = EndlessStdin()
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run_render(capsys, "-")
    assert (code, out) == (1, "") and "<stdin>: is larger than 2 MiB" in err
    assert stdin.chars_read == inputs.MAX_INPUT_BYTES + 1


def test_the_console_entry_refuses_without_a_traceback_and_renders_a_file_at_the_limit(tmp_path: Path) -> None:
    cases = {name: (content, named) for name, content, named in BAD_RENDER_INPUTS}
    files: dict[str, tuple[str, str | None]] = {
        "deep.yaml": (deep_flow(5000), "nested more than 64 levels"),
        "alias.yaml": (str(cases["billion laughs"][0]), "alias"),
        "args.yaml": (model_yaml("{model: o/n, extraArgs: [[1, 2]]}"), "spec.extraArgs[0]"),
    }
    # Valid and just under the size limit: read, parsed and rendered.
    text = (EXAMPLES / "01-small-hub-model.yaml").read_text()
    padding = "# " + "x" * 1021 + "\n"
    files["near-limit.yaml"] = (text + padding * ((inputs.MAX_INPUT_BYTES - len(text)) // len(padding)), None)
    assert inputs.MAX_INPUT_BYTES - len(padding) < len(files["near-limit.yaml"][0]) <= inputs.MAX_INPUT_BYTES
    for name, (content, named) in files.items():
        (tmp_path / name).write_text(content)
        result = subprocess.run(
            [sys.executable, "-m", "vllm_operator.cli", "render", "-f", str(tmp_path / name)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert "Traceback" not in result.stderr, name
        if named is None:
            assert result.returncode == 0 and "kind: Deployment" in result.stdout, result.stderr
        else:
            assert (result.returncode, result.stdout) == (1, ""), name
            assert named in result.stderr, (name, result.stderr)


def test_nesting_up_to_the_limit_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.yaml").write_text(deep_flow(61))  # 64 levels: the document, spec, affinity, x and 61 lists
    code, out, err = run_render(capsys, str(tmp_path / "m.yaml"))
    assert code == 0 and "kind: Deployment" in out, err


# --- the product's validation API ------------------------------------------------------------------------


def test_invalid_spec_names_the_field_and_the_fix() -> None:
    body = yaml.safe_load(model_yaml("{model: o/n, servedModelName: -x, replicas: many}"))
    with pytest.raises(validation.InvalidSpec) as err:
        validation.validate(body)
    assert err.value.field == "spec.replicas"
    assert {e.field for e in err.value.errors} == {"spec.replicas"}  # a schema error keeps CEL rules from running
    body["spec"]["replicas"] = 1
    with pytest.raises(validation.InvalidSpec) as err:
        validation.validate(body)
    assert (err.value.field, err.value.message) == ("spec.servedModelName", err.value.errors[0].message)
    assert "may not start with '-'" in err.value.message and "for example 'chat'" in err.value.message
    assert str(err.value) == f"spec.servedModelName: {err.value.message}"
    assert validation.validate(yaml.safe_load(model_yaml("{model: o/n}"))) is None


def test_a_deep_object_built_in_python_is_refused_without_recursion() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(100_000):
        inner["a"] = {}
        inner = inner["a"]
    body = {**yaml.safe_load(model_yaml("{model: o/n}")), "status": deep}
    (error,) = validation.problems(body)
    assert error.field.startswith("status.a.a") and "more than 64 levels" in error.message


def test_non_string_keys_are_refused() -> None:
    body = yaml.safe_load(model_yaml("{model: o/n, nodeSelector: {1: a}}"))
    (error,) = validation.problems(body)
    assert error.field == "spec.nodeSelector" and "keys are strings" in error.message


# --- the CRD's rules against the rules they mirror ------------------------------------------------------------

REVISIONS = [
    "main", "v1.0", "refs/pr/1", "feature/a_b", "a@b", "release-2024.01", "7ae557604adf67be50417f59c2c2f167def9a775",
    "main/../../../../x", "a//b", "/a", "a/", "a.", "a.lock", "a.lock/b", ".a", "b/.a", "@", "a@{1}", "a b", "a~1",
    "a^", "a:b", "a?", "a*", "a[", "a\\b", "a\tb", "a\x7fb", "a\x01", "..", "x/../y", "a/.lock", "ab.lock.x",
]  # fmt: skip


def _cel_accepts(**spec: Any) -> bool:
    body = yaml.safe_load(model_yaml("{model: o/n}"))
    body["spec"].update(spec)
    return not [e for e in validation.problems(body) if e.field.startswith("spec." + next(iter(spec)))]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_revision_rules_are_git_check_ref_format() -> None:
    for revision in REVISIONS:
        git = subprocess.run(["git", "check-ref-format", "--allow-onelevel", revision], capture_output=True, check=False)
        assert _cel_accepts(revision=revision) == (git.returncode == 0), revision
        if hasattr(layout, "revision_problem"):  # the runtime's own check (vllm-runtime cache) agrees
            assert (layout.revision_problem(revision) is None) == (git.returncode == 0), revision
    assert not _cel_accepts(revision="-x")  # git allows it; a revision must never look like a flag


REPO_IDS = [
    "Qwen/Qwen2.5-0.5B-Instruct", "a/b", "my_org/x_y.z-1", "org/" + "a" * 96, "o" * 96 + "/" + "n" * 96,
    "a--b/c", "org/name-", "org/name.", "-org/name", ".org/name", "org/-name", "org/" + "a" * 97, "o" * 97 + "/n",
    "org/name.git", "org..x/y", "org/x..y", "a/b/c", "org/na me", "org/caf\u00e9", "org", "org/", "/name", "org/n@me",
    "org/name\n",
]  # fmt: skip


def test_repo_id_rules_accept_only_what_huggingface_hub_and_the_runtime_accept() -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    refused = {"a--b/c", "org/name-", "org/" + "a" * 97, "org/name.git", "org..x/y", "a/b/c", "org/na me"}
    for repo_id in REPO_IDS:
        try:
            validate_repo_id(repo_id)
            hub_ok = "/" in repo_id  # the product also needs an organisation
        except HFValidationError:
            hub_ok = False
        accepted = _cel_accepts(model=repo_id)
        assert not accepted or hub_ok, f"{repo_id!r}: the CRD accepts what huggingface_hub refuses"
        if accepted:
            assert layout.parse_model(repo_id).repo_id == repo_id
        if repo_id in refused:
            assert not hub_ok and not accepted, repo_id
    assert all(_cel_accepts(model=m) for m in REPO_IDS[:5])


# --- extraArgs against vLLM's own parser (when vLLM is installed) ---------------------------------------------


@pytest.fixture(scope="module")
def vllm_parser() -> Any:
    pytest.importorskip("vllm")
    argparse_utils = pytest.importorskip("vllm.utils.argparse_utils")
    cli_args = pytest.importorskip("vllm.entrypoints.launchers.cli_args")
    return cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser())


def _vllm_dest(parser: Any, arg: str) -> str | None:
    """The setting vLLM's parser takes ``arg`` (followed by a value) for; None when it is not a flag it knows,
    or is ambiguous (vLLM refuses those at start-up).

    vLLM's own ``FlexibleArgumentParser.parse_args`` rewrites the arguments first (underscores to dashes,
    ``--flag.key v`` to ``--flag '{"key": "v"}'``, ``-O3``); what it hands to argparse is caught here and
    its first option resolved by argparse itself (abbreviations, glued short flags)."""
    handed: list[list[str]] = []

    def catch(self: Any, args: list[str], namespace: Any = None) -> None:
        handed.append(list(args))
        raise _Handed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        with contextlib.suppress(_Handed):
            if arg != "--config":  # --config reads the YAML file its value names (a channel of its own)
                parser.parse_args([arg, "v"])
    processed = handed[0] if handed else [arg]
    option = next((a for a in processed if a.startswith("-")), None)
    if option is None:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            found = parser._parse_optional(option)
    except SystemExit:  # ambiguous
        return None
    action = found[0] if found else None
    return str(action.dest) if action is not None else None


class _Handed(Exception):
    """Raised in place of argparse's parsing once vLLM's rewriting is done."""


def test_extra_args_refused_exactly_where_vllm_would_set_an_owned_setting(vllm_parser: Any) -> None:
    owned_dests = {vllm_parser._option_string_actions[flag].dest for flag in vllm_args.OWNED_FLAGS}
    # vLLM's own names for the owned settings (its aliases included), from the parser, not from vllm_args.
    owned_names = {f for f, action in vllm_parser._option_string_actions.items() if action.dest in owned_dests}
    owned_long = {f for f in owned_names if f.startswith("--")}
    spellings = set(vllm_parser._option_string_actions)  # every flag vLLM has, exactly
    for name in [f for f in spellings if f.startswith("--")]:
        if any(owned.startswith(name) or name.startswith(owned) for owned in owned_long):
            for spelled in {name[:n] for n in range(3, len(name) + 1)}:  # its abbreviations
                spellings |= {spelled, spelled + "=1", spelled + ".x", spelled + ".x=1", spelled + ".x+"}
            spellings |= {name.replace("-", "_").replace("__", "--", 1), name + "=1.5", name.replace("-", "_") + ".a_b"}
    for short in ("-q", "-tp", "-t"):
        spellings |= {short + "fp8", short + "=1", short + "8", short + ".x"}
    spellings |= {"--max-num-seqs=1.5", "--compilation-config.mode", "--tokenizer.x", "-O3", "-O.x", "--.x"}
    assert len(spellings) > 2000
    assert "--device-memory-utilization" in owned_long  # vLLM 0.32's alias of --gpu-memory-utilization
    (item_rule,) = crd.spec_schema()["properties"]["extraArgs"]["items"]["x-kubernetes-validations"]
    cel_rule = validation.compile_rule(item_rule["rule"])  # the CRD's rule, as the API server would judge it
    for arg in sorted(spellings):
        # --config FILE sets whatever the file says, owned settings included (test_a_config_file_...)
        reaches = _vllm_dest(vllm_parser, arg) in owned_dests or arg == vllm_args.CONFIG_FILE_FLAG
        refused = vllm_args.owned_flag_of(arg) is not None
        assert not (reaches and not refused), f"{arg!r} reaches an owned vLLM setting but is not refused"
        assert (not cel_rule.evaluate({"self": celtypes.StringType(arg)})) == refused, f"{arg!r}: the CRD and vllm_args differ"
        if arg in vllm_parser._option_string_actions:  # a real flag: refused only if it is owned
            assert refused == reaches, f"{arg!r}: a vLLM flag refused although the operator does not own it"
        elif refused and not reaches:  # refused although vLLM would not take it: vLLM refuses it too
            assert _vllm_dest(vllm_parser, arg) is None, arg


def test_lora_flags_refused_exactly_where_vllm_would_set_a_lora_setting(vllm_parser: Any) -> None:
    """With ``spec.adapters`` serve owns vLLM's LoRA flags: the same oracle as above, for them."""
    lora_dests = {vllm_parser._option_string_actions[flag].dest for flag in vllm_args.lora_flags(
        max_loras=1, max_lora_rank=8, max_cpu_loras=1) if flag.startswith("--")}  # fmt: skip
    assert lora_dests == {"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"}
    lora_long = {f for f, a in vllm_parser._option_string_actions.items() if a.dest in lora_dests and f.startswith("--")}
    assert "--no-enable-lora" in lora_long
    spellings = {f for f in vllm_parser._option_string_actions if "lora" in f}  # every LoRA-ish flag vLLM has
    for name in [f for f in vllm_parser._option_string_actions if f.startswith("--")]:
        near = "lora" in name or name.startswith(("--max-", "--enable-", "--no-enable-"))  # abbreviations may clash
        if near or any(lora.startswith(name) or name.startswith(lora) for lora in lora_long):
            for spelled in {name[:n] for n in range(3, len(name) + 1)}:  # its abbreviations
                spellings |= {spelled, spelled + "=1", spelled + ".x", spelled + ".x=1", "-" + spelled[2:]}
            spellings |= {name.replace("-", "_").replace("__", "--", 1), name + "=8", name.replace("-", "_") + ".a_b"}
    assert len(spellings) > 3000
    (rule,) = [r for r in crd.spec_schema()["x-kubernetes-validations"] if r.get("fieldPath") == ".extraArgs"]
    cel_rule = validation.compile_rule(rule["rule"])  # the CRD's rule, as the API server would judge it
    adapters = celtypes.ListType([celtypes.MapType({celtypes.StringType("name"): celtypes.StringType("a")})])
    for arg in sorted(spellings):
        reaches = _vllm_dest(vllm_parser, arg) in lora_dests
        refused = vllm_args.lora_flag_of(arg) is not None
        assert not (reaches and not refused), f"{arg!r} reaches a LoRA setting but is not refused"
        spec = celtypes.MapType({celtypes.StringType("adapters"): adapters,
                                 celtypes.StringType("extraArgs"): celtypes.ListType([celtypes.StringType(arg)])})  # fmt: skip
        assert (not cel_rule.evaluate({"self": spec})) == refused, f"{arg!r}: the CRD and vllm_args differ"
        if arg in vllm_parser._option_string_actions:  # a real flag: refused only if it is a LoRA flag
            assert refused == reaches, f"{arg!r}: a vLLM flag refused although serve does not set it"
        elif refused and not reaches:  # refused although vLLM would not take it: vLLM refuses it too
            assert _vllm_dest(vllm_parser, arg) is None, arg


def test_a_config_file_really_sets_owned_settings(vllm_parser: Any, tmp_path: Path) -> None:
    """Why ``--config`` is refused: vLLM fills every flag the command line leaves out from the file."""
    (tmp_path / "flags.yaml").write_text("served-model-name: other\nmax-model-len: 4096\n")
    with contextlib.redirect_stderr(io.StringIO()):
        parsed = vllm_parser.parse_args(["--model", "m", "--config", str(tmp_path / "flags.yaml")])
        spelled = vllm_parser.parse_args(["--model", "m", f"--config={tmp_path / 'flags.yaml'}"])
    assert (parsed.served_model_name, parsed.max_model_len) == (["other"], 4096)
    assert (spelled.served_model_name, spelled.max_model_len) == (None, None)  # only the exact token reads it
    assert vllm_args.owned_flag_of("--config") == "--config" and vllm_args.owned_flag_of("--config=x") is None
    with pytest.raises(vllm_args.OwnedFlagError, match="reads flags from a file"):
        vllm_args.check_extra_args(["--config", "/models/flags.yaml"])


def test_the_dotted_form_really_sets_the_owned_setting(vllm_parser: Any) -> None:
    """The oracle above is right about ``--flag.key``: vLLM's full parse does set the owned setting."""
    with contextlib.redirect_stderr(io.StringIO()):
        default = vllm_parser.parse_args([]).served_model_name
        parsed = vllm_parser.parse_args(["--served_model.x", "chat"]).served_model_name
    assert default is None and parsed == ['{"x": "chat"}']
    assert vllm_args.owned_flag_of("--served_model.x") == "--served-model-name"


# --- serve refuses what only extraArgs can have put on its command line -----------------------------------------


@pytest.mark.parametrize(
    "arg",
    ["-qfp8", "--max-model-le", "--no-enforce-eager", "--revisio", "--trust_remote_code", "--device-memory-util", "--seed.x",
     "--config"],
)
def test_serve_refuses_owned_flags_in_disguise(arg: str) -> None:
    spec_flags = vllm_args.vllm_flags({"quantization": "awq", "maxModelLen": 4096, "enforceEager": True})
    serve.check_runtime_flags(spec_flags)  # the operator's own spelling passes
    with pytest.raises(serve.ServeError) as err:
        serve.check_runtime_flags([*spec_flags, arg, "1"])
    assert err.value.reason == "InvalidArgs" and "spec.extraArgs" in err.value.message
