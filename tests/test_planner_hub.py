"""The planner over the Hub protocol: config through huggingface_hub, safetensors headers by Range only."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_runtime.devhub.server import DevHub
from vllm_runtime.devhub.tiny_model import generate
from vllm_runtime.planner import plan_model


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model split into several shards with an index, as large repos are."""
    return generate(tmp_path_factory.mktemp("sharded"), shard_bytes=200_000)


def test_plan_from_hub_reads_only_headers(
    devhub: DevHub, sharded_model: Path, tmp_path: Path, hub_environ: dict[str, str]
) -> None:
    commit = devhub.add_repo("test-org/sharded", sharded_model)
    shards = sorted(p.name for p in sharded_model.glob("*.safetensors"))
    assert len(shards) > 1
    devhub.clear_log()
    plan = plan_model("test-org/sharded", endpoint=devhub.url, cache_dir=tmp_path / "hub", gpu="L4")
    local = plan_model(str(sharded_model), gpu="L4")
    assert plan.commit == commit and plan.source == "hub"
    assert (plan.parameters, plan.weight_bytes, plan.kv_cache_bytes_per_token) == (
        local.parameters, local.weight_bytes, local.kv_cache_bytes_per_token,
    )  # fmt: skip
    weight_gets = [r for r in devhub.content_gets() if r.path.endswith(".safetensors")]
    assert sorted(r.path.rsplit("/", 1)[1] for r in weight_gets) == shards
    for r in weight_gets:
        assert r.range is not None and r.range.startswith("bytes=0-")
        size = (sharded_model / r.path.rsplit("/", 1)[1]).stat().st_size
        assert r.bytes_sent < size  # only the header's neighbourhood, never the whole file


def test_plan_pins_a_revision(devhub: DevHub, tiny_model_dir: Path, tmp_path: Path, hub_environ: dict[str, str]) -> None:
    first = devhub.add_repo("test-org/tiny", tiny_model_dir)
    plan = plan_model("test-org/tiny", revision=first, endpoint=devhub.url, cache_dir=tmp_path / "hub")
    assert plan.commit == first and plan.revision == first


def test_missing_repo_raises_the_hubs_typed_error(devhub: DevHub, tmp_path: Path, hub_environ: dict[str, str]) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        plan_model("test-org/nothing", endpoint=devhub.url, cache_dir=tmp_path / "hub")


def test_without_cache_dir_nothing_is_written(
    devhub: DevHub, tiny_model_dir: Path, hub_environ: dict[str, str]
) -> None:
    devhub.add_repo("test-org/tiny", tiny_model_dir)
    home = Path(hub_environ["HF_HOME"])
    before = sorted(home.rglob("*"))
    plan = plan_model("test-org/tiny", endpoint=devhub.url, gpu="L4")
    assert plan.parameters > 0 and plan.fits is True
    assert sorted(home.rglob("*")) == before
