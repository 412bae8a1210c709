"""The loopback Hub speaks the protocol huggingface_hub expects (so cache tests test the real client)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from vllm_runtime.devhub.server import DevHub, Fault
from vllm_runtime.devhub.tiny_model import DEFAULT_SHAPE, generate, parse_size, shape_for_target_bytes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_a_llama_vllm_cpu_can_serve(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] >= 32  # vLLM's CPU attention needs it
    tokenizer = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"]) >= config["vocab_size"] - 3
    from safetensors.numpy import load_file

    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert sum(t.size for t in tensors.values()) == DEFAULT_SHAPE.parameters()


def test_target_bytes_grows_and_shards_the_model(tmp_path: Path) -> None:
    shape = shape_for_target_bytes(parse_size("1GiB"), 4)
    assert 0.95 < shape.parameters() * 4 / 2**30 < 1.1
    out = generate(tmp_path, target_bytes=parse_size("40MB"), shard_bytes=parse_size("16MB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).exists() for s in shards)


def test_snapshot_download_gets_identical_files(devhub: DevHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    commit = devhub.add_repo("org/tiny", tiny_model_dir)
    path = Path(snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=devhub.url))
    assert path.name == commit
    for source in tiny_model_dir.iterdir():
        assert _sha256(path / source.name) == _sha256(source)
    # A commit revision that is fully cached makes no request at all.
    devhub.clear_log()
    snapshot_download("org/tiny", revision=commit, cache_dir=tmp_path, endpoint=devhub.url)
    assert devhub.log_snapshot() == []


def test_branches_tags_and_tree_listing(devhub: DevHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    first = devhub.add_repo("org/tiny", tiny_model_dir)
    changed = tmp_path / "v2"
    changed.mkdir()
    for source in tiny_model_dir.iterdir():
        (changed / source.name).write_bytes(source.read_bytes())
    (changed / "README.md").write_text("second commit\n")
    second = devhub.add_commit("org/tiny", changed)
    devhub.create_tag("org/tiny", "v1.0", first)
    devhub.create_branch("org/tiny", "stable", first)
    api = HfApi(endpoint=devhub.url)
    assert api.repo_info("org/tiny").sha == second
    assert api.repo_info("org/tiny", revision="v1.0").sha == first
    assert api.repo_info("org/tiny", revision="stable").sha == first
    devhub.tree_page_size = 2  # forces pagination through the Link header
    files = {f.path: f for f in api.list_repo_tree("org/tiny", revision=first, recursive=True)}
    assert "README.md" not in files
    lfs = files["model.safetensors"].lfs  # type: ignore[union-attr]
    assert lfs is not None and lfs.sha256 == _sha256(tiny_model_dir / "model.safetensors")


def test_errors_are_typed_like_the_hub(devhub: DevHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    devhub.add_repo("org/gated", tiny_model_dir, gated=True, token="hf_right")
    devhub.add_repo("org/tiny", tiny_model_dir)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", cache_dir=tmp_path, endpoint=devhub.url, token=False)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", cache_dir=tmp_path, endpoint=devhub.url, token="hf_wrong")
    assert hf_hub_download("org/gated", "config.json", cache_dir=tmp_path, endpoint=devhub.url, token="hf_right")
    with pytest.raises(RepositoryNotFoundError) as not_found:
        HfApi(endpoint=devhub.url).repo_info("org/missing")
    assert not isinstance(not_found.value, GatedRepoError)
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=devhub.url).repo_info("org/tiny", revision="no-such-branch")
    assert not any(r.authorized for r in devhub.log_snapshot()[:1])  # token=False sends none


def test_range_requests_and_faults(devhub: DevHub, tiny_model_dir: Path) -> None:
    commit = devhub.add_repo("org/tiny", tiny_model_dir)
    url = f"{devhub.url}/org/tiny/resolve/{commit}/model.safetensors"
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    head = httpx.head(url)
    assert head.headers["X-Repo-Commit"] == commit
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert int(head.headers["X-Linked-Size"]) == len(data)
    part = httpx.get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == data[8:16]
    devhub.inject(Fault("rate_limit", path="*/resolve/*", retry_after=7))
    limited = httpx.get(url)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    devhub.inject(Fault("corrupt", path="*model.safetensors", after_bytes=100))
    corrupted = httpx.get(url).content
    assert len(corrupted) == len(data) and corrupted != data
    assert httpx.get(url).content == data  # times=1: only the first matching request
    assert devhub.wait_idle()  # a handler logs its request after the client has its response
    faults = [r.fault for r in devhub.content_gets("model.safetensors")][-3:]
    assert sorted(faults, key=str) == sorted(["rate_limit", "corrupt", None], key=str)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_variants_have_checkpoint_shapes(tmp_path: Path, method: str) -> None:
    from safetensors.numpy import load_file

    out = generate(tmp_path, quantization=method)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == method
    group = config["quantization_config"]["group_size"]
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    qweight = tensors["model.layers.0.mlp.down_proj.qweight"]  # down_proj: in 128 -> out 64
    assert qweight.shape == ((128 // 8, 64) if method == "gptq" else (128, 64 // 8))
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (128 // group, 64)
    assert tensors["model.embed_tokens.weight"].shape == (512, 64)  # embeddings stay unquantized


def test_lfs_redirect_to_a_cdn_drops_the_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    with DevHub(redirect_lfs=True) as hub:
        hub.add_repo("org/gated", tiny_model_dir, gated=True, token="hf_right")
        path = Path(snapshot_download("org/gated", cache_dir=tmp_path, endpoint=hub.url, token="hf_right"))
        assert _sha256(path / "model.safetensors") == _sha256(tiny_model_dir / "model.safetensors")
        cdn = [r for r in hub.content_gets("model.safetensors") if r.path.startswith("/cdn-lfs/")]
        assert len(cdn) == 1 and not cdn[0].authorized  # the signed-URL host never sees the token
        assert all(r.authorized for r in hub.content_gets("config.json"))
