"""The contract modules shared by the operator and the runtime: cache layout and the vLLM flag mapping."""

import json
from pathlib import Path

import pytest

from vllm_runtime import layout, units, vllm_args
from vllm_runtime.summary import Summary, parse_termination_message


@pytest.mark.parametrize(
    ("uri", "repo_id", "claim", "local_dir"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", None, None),
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None, None),
        ("pvc://models/llama/8b", None, "models", "/models/models/llama/8b"),
        ("pvc://weights", None, "weights", "/models/weights"),
        ("pvc://weights/", None, "weights", "/models/weights"),
    ],
)
def test_parse_model_accepts_repo_ids_and_volume_paths(
    uri: str, repo_id: str | None, claim: str | None, local_dir: str | None
) -> None:
    source = layout.parse_model(uri)
    assert source.repo_id == repo_id
    assert source.claim == claim
    assert source.is_hub == (repo_id is not None)
    if local_dir:
        assert source.local_dir() == local_dir
    else:
        with pytest.raises(ValueError):
            source.local_dir()


@pytest.mark.parametrize("uri", ["llama", "org/name/extra", "s3://bucket/x", "pvc://Bad_Claim/x", "../etc/passwd", "org/.."])
def test_parse_model_rejects_other_forms_naming_the_field(uri: str) -> None:
    with pytest.raises(ValueError, match=r"spec\.model"):
        layout.parse_model(uri)


def test_layout_paths_follow_huggingface_cache_layout(tmp_path: Path) -> None:
    cache = layout.CacheLayout(tmp_path)
    commit = "a" * 40
    assert cache.hub_cache == tmp_path / "hub"
    assert cache.snapshot_dir("org/name", commit) == tmp_path / "hub" / "models--org--name" / "snapshots" / commit
    assert cache.manifest_path("org/name", commit).name == f"{commit}.json"
    assert layout.is_commit(commit) and not layout.is_commit("main") and not layout.is_commit("A" * 40)


def test_vllm_flags_map_every_field_in_stable_order() -> None:
    spec = {
        "model": "org/name",
        "quantization": "awq",
        "dtype": "float16",
        "gpuMemoryUtilization": 0.85,
        "maxModelLen": 4096,
        "tensorParallelSize": 2,
        "loadFormat": "safetensors",
        "seed": 7,
        "kvCacheDtype": "fp8",
        "servedModelName": "chat",
        "enforceEager": True,
        "trustRemoteCode": False,
        "extraArgs": ["--max-num-seqs", "8"],
    }
    flags = vllm_args.vllm_flags(spec)
    assert flags == [
        "--quantization", "awq", "--dtype", "float16", "--gpu-memory-utilization", "0.85",
        "--max-model-len", "4096", "--tensor-parallel-size", "2", "--load-format", "safetensors",
        "--seed", "7", "--kv-cache-dtype", "fp8", "--served-model-name", "chat",
        "--enforce-eager", "--max-num-seqs", "8",
    ]  # fmt: skip
    # The runtime reads the same settings back from the command line the operator wrote.
    back = vllm_args.settings_from_flags(flags)
    for field in vllm_args.VALUE_FLAGS:
        assert back[field] == spec[field]
    assert back["enforceEager"] is True and "trustRemoteCode" not in back


def test_auto_values_are_left_to_the_planner() -> None:
    assert vllm_args.vllm_flags({"maxModelLen": "auto", "tensorParallelSize": "auto"}) == []


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--model", "x"], "--model (set by the operator)"),
        (["--max_model_len=4096"], "--max-model-len (use spec.maxModelLen)"),
        (["--trust-remote-code"], "--trust-remote-code (use spec.trustRemoteCode)"),
        (["--port", "1"], "--port (set by the operator)"),
    ],
)
def test_owned_flags_are_refused_in_extra_args(extra: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=r"spec\.extraArgs") as err:
        vllm_args.vllm_flags({"extraArgs": extra})
    assert named in str(err.value)


def test_compile_cache_key_separates_configurations() -> None:
    base = {"dtype": "bfloat16", "tensorParallelSize": 1}
    key = vllm_args.compile_cache_key(vllm_version="0.32.0", commit="a" * 40, accelerator="H100", settings=base)
    same = vllm_args.compile_cache_key(vllm_version="0.32.0", commit="a" * 40, accelerator="H100", settings=dict(base))
    assert key == same and "/" not in key
    for change in (
        {"vllm_version": "0.33.0"},
        {"commit": "b" * 40},
        {"accelerator": "A100"},
        {"settings": {**base, "tensorParallelSize": 2}},
        {"settings": {**base, "quantization": "fp8"}},
    ):
        args = {"vllm_version": "0.32.0", "commit": "a" * 40, "accelerator": "H100", "settings": base, **change}
        assert vllm_args.compile_cache_key(**args) != key  # type: ignore[arg-type]


def test_summary_round_trips_through_termination_message() -> None:
    s = Summary(ok=False, command="cache", model="org/name", revision="main", reason="GatedRepo", message="x" * 9000)
    line = s.to_json()
    assert len(line.encode()) <= 4096
    parsed = parse_termination_message("some log line\n" + line + "\n")
    assert parsed is not None and parsed["reason"] == "GatedRepo" and parsed["ok"] is False
    assert parse_termination_message("not json") is None


def test_summary_drops_largest_extras_to_fit_and_says_so() -> None:
    s = Summary(
        ok=True, command="cache", model="org/name", revision="main", commit="a" * 40, message="m" * 3000,
        extra={"plan": {"notes": "p" * 5000}, "weightFormat": "safetensors"},
    )  # fmt: skip
    data = json.loads(s.to_json())
    assert len(s.to_json().encode()) <= 4096
    assert data["commit"] == "a" * 40 and data["weightFormat"] == "safetensors"
    assert data["truncated"] == ["plan"] and "plan" not in data


@pytest.mark.parametrize(
    ("text", "expected"),
    [("80GiB", 80 * 1024**3), ("80Gi", 80 * 1024**3), ("24GB", 24 * 10**9), ("500M", 500 * 10**6),
     ("1.5Ti", int(1.5 * 1024**4)), ("2P", 2 * 10**15), ("123", 123), (4096, 4096)],
)  # fmt: skip
def test_one_size_parser_reads_what_people_and_kubernetes_write(text: str | int, expected: int) -> None:
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "10 gigs", "-1Gi", "1.Gi", ""])
def test_bad_sizes_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"80GiB, 80Gi, 500MB"):
        units.parse_size(text)


def test_human_bytes() -> None:
    assert [units.human_bytes(n) for n in (None, 0, 1023, 1536, 3 * 1024**3, 5 * 1024**4)] == [
        "0 B", "0 B", "1023 B", "1.5 KiB", "3.0 GiB", "5.0 TiB",
    ]  # fmt: skip
