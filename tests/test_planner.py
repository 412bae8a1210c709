"""Memory planner: parameter counts of real models, KV cache geometry, verdicts and suggestions, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import argparse

from vllm_runtime.planner import check_gpu_before_start, plan_from_facts, plan_model
from vllm_runtime.planner import arch, gpus, quant
from vllm_runtime.planner import cli as planner_cli
from vllm_runtime.planner.sources import ModelFacts, TensorSpec, choose_weight_files, load_local, load_summary

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def run_plan(argv: list[str]) -> int:
    """``vllm-runtime plan`` through the planner's own ``register`` (as the runtime CLI wires it)."""
    parser = argparse.ArgumentParser(prog="vllm-runtime")
    planner_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def facts(name: str):  # type: ignore[no-untyped-def]
    return load_summary(FIXTURES / name)


# Published total parameter counts, checked within 1%. Sources: the Hugging Face model pages' safetensors
# parameter badges (Llama 3.1 8B "8.03B", 70B "70.6B", Mistral 7B v0.3 "7.25B"), Qwen2.5-7B's model card
# ("Number of Parameters: 7.61B"), Mistral AI's Mixtral announcement ("46.7B total parameters"),
# DeepSeek-V2-Lite's model card ("15.7B total parameters"), OpenAI's gpt-oss model card (gpt-oss-20b
# "20.91B" total). Quantized variants have the parameters of the model they were made from.
PUBLISHED = {
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "qwen2.5-7b": 7.61e9,
    "mistral-7b-v0.3": 7.25e9,
    "mixtral-8x7b": 46.7e9,
    "deepseek-v2-lite": 15.7e9,
    "gpt-oss-20b": 20.91e9,
    "llama-3.1-8b-instruct-gptq-int4": 8.03e9,
    "qwen2.5-7b-instruct-awq": 7.61e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name: str) -> None:
    plan = plan_from_facts(facts(name))
    assert plan.parameters == pytest.approx(PUBLISHED[name], rel=0.01)


def test_quantized_variants_unpack_to_the_base_models_count() -> None:
    # GPTQ/AWQ pack 8 four-bit values per int32; scales, zeros and g_idx are metadata, not parameters.
    assert plan_from_facts(facts("llama-3.1-8b-instruct-gptq-int4")).parameters == plan_from_facts(facts("llama-3.1-8b")).parameters
    assert plan_from_facts(facts("qwen2.5-7b-instruct-awq")).parameters == plan_from_facts(facts("qwen2.5-7b")).parameters


def test_weight_bytes_are_the_stored_bytes() -> None:
    f = facts("llama-3.1-8b")
    plan = plan_from_facts(f)
    assert plan.weight_bytes == 2 * plan.parameters  # all bf16
    gptq = plan_from_facts(facts("llama-3.1-8b-instruct-gptq-int4"))
    w = quant.count_weights(facts("llama-3.1-8b-instruct-gptq-int4").tensors, {"quantization_config": {"bits": 4}})
    # 4-bit linear layers + fp16 scales per 128 + packed zeros per 128 + int32 g_idx; fp16 embeddings/head.
    linear = w.linear_parameters
    in_features_total = sum(t.shape[0] for n, t in f.tensors.items() if False)  # g_idx: one int32 per input row
    assert in_features_total == 0
    expected_min = linear // 2 + linear // 128 * 2 + w.other_parameters * 2
    assert expected_min < gptq.weight_bytes < expected_min * 1.02
    gpt_oss = plan_from_facts(facts("gpt-oss-20b"))
    assert 12.5 * gpus.GiB < gpt_oss.weight_bytes < 13.2 * gpus.GiB  # the MXFP4 checkpoint is 13.8 GB


@pytest.mark.parametrize(
    ("name", "per_token", "attention"),
    [
        ("llama-3.1-8b", 32 * 2 * 8 * 128 * 2, "GQA"),
        ("llama-3.1-70b", 80 * 2 * 8 * 128 * 2, "GQA"),
        ("qwen2.5-7b", 28 * 2 * 4 * 128 * 2, "GQA"),  # carries sliding_window but use_sliding_window is false
        ("mistral-7b-v0.3", 32 * 2 * 8 * 128 * 2, "GQA"),
        ("mixtral-8x7b", 32 * 2 * 8 * 128 * 2, "GQA"),
        ("deepseek-v2-lite", 27 * (512 + 64) * 2, "MLA"),  # one latent per token: kv_lora_rank + rope dims
        ("gpt-oss-20b", 24 * 2 * 8 * 64 * 2, "GQA+sliding"),
    ],
)
def test_kv_bytes_per_token(name: str, per_token: int, attention: str) -> None:
    plan = plan_from_facts(facts(name))
    assert plan.kv_cache_bytes_per_token == per_token
    assert plan.attention == attention
    fp8 = plan_from_facts(facts(name), kv_cache_dtype="fp8")
    assert fp8.kv_cache_bytes_per_token == per_token // 2


def test_tensor_parallel_splits_kv_heads_but_not_the_mla_latent() -> None:
    llama = facts("llama-3.1-8b").config
    assert arch.kv_geometry(llama, tensor_parallel_size=2).bytes_per_token() * 2 == arch.kv_geometry(llama).bytes_per_token()
    # More ranks than KV heads: vLLM replicates heads, one per rank.
    assert arch.kv_geometry(llama, tensor_parallel_size=16).kv_heads_per_gpu == 1
    mla = facts("deepseek-v2-lite").config
    assert arch.kv_geometry(mla, tensor_parallel_size=4).bytes_per_token() == arch.kv_geometry(mla).bytes_per_token()


def test_sliding_window_layers_cost_at_most_their_window() -> None:
    geometry = arch.kv_geometry(facts("gpt-oss-20b").config)
    full_only = geometry.bytes_per_token(include_sliding=False)
    assert full_only * 2 == geometry.bytes_per_token()  # 12 full + 12 sliding layers
    short = geometry.blocks_per_sequence(64, 16, max_batched_tokens=0)
    long = geometry.blocks_per_sequence(64_000, 16, max_batched_tokens=0)
    # The full-attention group grows with the sequence; the sliding group stops at its 128-token window.
    assert long - short == math.ceil(64_000 / 16) - math.ceil(64 / 16) + (math.ceil(127 / 16) - math.ceil(64 / 16))


def test_unsupported_architectures_are_flagged() -> None:
    config = {"model_type": "jamba", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "layers_block_type": ["mamba"] * 4}
    assert arch.kv_geometry(config).unsupported
    assert arch.kv_geometry({"model_type": "x"}).unsupported


def test_context_length_follows_rope_scaling() -> None:
    assert arch.derived_max_model_len(facts("llama-3.1-8b").config) == 131072
    assert arch.derived_max_model_len(facts("deepseek-v2-lite").config) == 4096 * 40
    assert arch.derived_max_model_len(facts("gpt-oss-20b").config) == 4096 * 32


def test_llama_70b_does_not_fit_one_h100_and_says_what_would() -> None:
    plan = plan_from_facts(facts("llama-3.1-70b"), gpu="H100")
    assert plan.fits is False
    assert "weights need" in plan.reason
    assert any("tensorParallelSize" in s for s in plan.suggestions)
    assert any("4-bit" in s for s in plan.suggestions)


def test_auto_tensor_parallel_picks_the_fewest_gpus_that_fit() -> None:
    plan = plan_from_facts(facts("llama-3.1-70b"), gpu="H100", tensor_parallel_size="auto", max_model_len=8192)
    assert plan.fits is True
    chosen = plan.chosen["tensorParallelSize"]
    assert chosen == plan.tensor_parallel_size and chosen in (2, 4)
    for fewer in (1, 2, 4):
        if fewer < chosen:
            assert plan_from_facts(facts("llama-3.1-70b"), gpu="H100", tensor_parallel_size=fewer, max_model_len=8192).fits is False
    on_h200 = plan_from_facts(facts("llama-3.1-70b"), gpu="H200", tensor_parallel_size="auto", max_model_len=8192)
    assert on_h200.chosen == {"tensorParallelSize": 2}


def test_suggested_max_model_len_is_the_boundary() -> None:
    plan = plan_from_facts(facts("llama-3.1-8b"), gpu="L4")  # 128k context on 24 GB
    assert plan.fits is False
    longest = plan.max_model_len_that_fits
    assert longest and any(f"maxModelLen to {longest // 1024 * 1024}" in s for s in plan.suggestions)
    assert plan_from_facts(facts("llama-3.1-8b"), gpu="L4", max_model_len=longest).fits is True
    assert plan_from_facts(facts("llama-3.1-8b"), gpu="L4", max_model_len=longest + 16).fits is False
    auto = plan_from_facts(facts("llama-3.1-8b"), gpu="L4", max_model_len="auto")
    assert auto.fits is True and auto.chosen["maxModelLen"] <= longest
    fp8 = plan_from_facts(facts("llama-3.1-8b"), gpu="L4", kv_cache_dtype="fp8")
    assert fp8.max_model_len_that_fits and fp8.max_model_len_that_fits > 1.9 * longest


def test_capacity_arithmetic_is_consistent() -> None:
    plan = plan_from_facts(facts("mistral-7b-v0.3"), gpu="H100", max_model_len=8192)
    assert plan.fits is True
    assert plan.overhead is not None and plan.budget_bytes_per_gpu is not None and plan.kv_cache_bytes_per_gpu
    assert plan.budget_bytes_per_gpu == math.ceil(gpus.GPU_TYPES["H100"].memory_bytes * 0.9)
    assert plan.kv_cache_bytes_per_gpu == plan.budget_bytes_per_gpu - plan.weight_bytes_per_gpu - plan.overhead.total
    assert plan.num_blocks == plan.kv_cache_bytes_per_gpu // (plan.kv_cache_bytes_per_token * 16)
    assert plan.max_tokens_in_flight == plan.num_blocks * 16
    assert plan.max_concurrent_sequences == plan.num_blocks // (8192 // 16)
    eager = plan_from_facts(facts("mistral-7b-v0.3"), gpu="H100", max_model_len=8192, enforce_eager=True)
    assert eager.overhead and eager.overhead.cuda_graphs == 0 and eager.num_blocks and eager.num_blocks > plan.num_blocks


def test_quantization_choices() -> None:
    base = plan_from_facts(facts("llama-3.1-8b"))
    fp8 = plan_from_facts(facts("llama-3.1-8b"), quantization="fp8")
    linear = quant.count_weights(facts("llama-3.1-8b").tensors, {}).linear_parameters
    assert fp8.weight_bytes == pytest.approx(base.weight_bytes - linear, rel=0.001)
    awq = plan_from_facts(facts("llama-3.1-8b"), quantization="awq", gpu="H100")
    assert awq.fits is False and "pre-quantized" in awq.reason
    wrong = plan_from_facts(facts("qwen2.5-7b-instruct-awq"), quantization="gptq", gpu="H100")
    assert wrong.fits is False and "does not match" in wrong.reason
    marlin = plan_from_facts(facts("qwen2.5-7b-instruct-awq"), quantization="awq_marlin", gpu="H100", max_model_len=4096)
    assert marlin.fits is True


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="gpuMemoryUtilization"):
        plan_from_facts(facts("llama-3.1-8b"), gpu="H100", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="unknown GPU type"):
        plan_from_facts(facts("llama-3.1-8b"), gpu="A100")
    with pytest.raises(ValueError, match="kvCacheDtype"):
        plan_from_facts(facts("llama-3.1-8b"), gpu="H100", kv_cache_dtype="int3")
    plan = plan_from_facts(facts("llama-3.1-8b"), gpu="H100", tensor_parallel_size=3)
    assert plan.fits is False and "divide" in plan.reason


def test_memory_sizes_parse() -> None:
    assert gpus.parse_memory("80GiB") == 80 * 1024**3
    assert gpus.parse_memory("80Gi") == 80 * 1024**3
    assert gpus.parse_memory("24GB") == 24 * 10**9
    assert gpus.parse_memory("81559MiB") == 81559 * 1024**2
    with pytest.raises(ValueError):
        gpus.parse_memory("lots")


def test_allocator_model_rounds_like_the_cuda_caching_allocator() -> None:
    assert quant.cuda_allocated_bytes([1]) == 512
    assert quant.cuda_allocated_bytes([1000, 1000]) == 2048
    # A 10.5 MiB tensor gets a 12 MiB segment; the 1.5 MiB tail is split off and not counted.
    assert quant.cuda_allocated_bytes([21 * 2**19]) == 21 * 2**19
    # A 11.5 MiB tensor's 0.5 MiB tail is too small to split: it counts as allocated.
    assert quant.cuda_allocated_bytes([23 * 2**19]) == 12 * 2**20


def test_weight_files_choice() -> None:
    assert choose_weight_files(["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], None) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert choose_weight_files(["model.safetensors", "other.safetensors"], None) == ["model.safetensors"]
    assert choose_weight_files(["a.safetensors"], {"weight_map": {"x": "b.safetensors"}}) == ["b.safetensors"]


@pytest.fixture
def local_model(tmp_path: Path) -> Path:
    """A two-shard Llama-shaped model on disk with an index, bf16 stored as uint16 bit patterns."""
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
              "torch_dtype": "float16"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": (256, 64), "model.layers.0.self_attn.q_proj.weight": (64, 64)},
        "model-00002-of-00002.safetensors": {"model.layers.1.self_attn.k_proj.weight": (32, 64), "lm_head.weight": (256, 64), "model.norm.weight": (64,)},
    }  # fmt: skip
    weight_map = {}
    for fname, tensors in shards.items():
        save_file({n: np.zeros(s, dtype=np.float16) for n, s in tensors.items()}, str(tmp_path / fname))
        weight_map.update({n: fname for n in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "consolidated.safetensors").write_bytes(b"not read")
    return tmp_path


def test_local_directory_reads_headers(local_model: Path) -> None:
    f = load_local(local_model)
    assert f.weight_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    plan = plan_model(str(local_model), gpu_memory_bytes=gpus.parse_memory("1GiB"), max_model_len=512)
    assert plan.parameters == 256 * 64 * 2 + 64 * 64 + 32 * 64 + 64
    assert plan.weight_bytes == plan.parameters * 2
    assert plan.weight_bytes_allocated >= plan.weight_bytes
    assert plan.kv_cache_bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_cli_json_has_the_contract_fields(local_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_plan(["plan", "--model", str(local_model), "--gpu-memory", "1GiB", "--max-model-len", "auto", "--json"])
    out = json.loads(capsys.readouterr().out)
    for key in ("parameters", "weight_bytes", "kv_cache_bytes_per_token", "kv_cache_bytes", "max_tokens_in_flight",
                "max_concurrent_sequences", "fits", "reason", "suggestions", "max_model_len", "tensor_parallel_size"):  # fmt: skip
        assert key in out
    assert code == 0 and out["fits"] is True and out["chosen"] == {"maxModelLen": 512}


def test_cli_table_and_exit_code_when_it_does_not_fit(local_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_plan(["plan", "--model", str(local_model), "--gpu-memory", "100MB"])
    text = capsys.readouterr().out
    assert code == 3
    assert "DOES NOT FIT" in text and "overhead per GPU" in text and "suggestion" in text


def test_cli_refuses_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(["plan", "--model", str(tmp_path), "--gpu", "H100"]) == 3
    assert "config.json" in capsys.readouterr().err


def test_check_gpu_before_start(local_model: Path) -> None:
    total = gpus.parse_memory("1GiB")
    busy = check_gpu_before_start(local_model, {"gpuMemoryUtilization": 0.9}, free_bytes=[total // 2], total_bytes=[total])
    assert busy.ok is False and "another process" in busy.reason
    ok = check_gpu_before_start(local_model, {"maxModelLen": 512}, free_bytes=[total], total_bytes=[total])
    assert ok.ok is True and ok.plan is not None
    small = gpus.parse_memory("100MB")
    tight = check_gpu_before_start(local_model, {}, free_bytes=[small], total_bytes=[small])
    assert tight.ok is False and "try:" in tight.reason
    assert check_gpu_before_start(local_model, {"tensorParallelSize": 2}, free_bytes=[total], total_bytes=[total]).ok is False


def _facts(config: dict, tensors: dict) -> ModelFacts:  # type: ignore[type-arg]
    return ModelFacts(model="synthetic", config=config, tensors={n: TensorSpec(d, tuple(s)) for n, (d, s) in tensors.items()})


def test_fp8_and_bitsandbytes_checkpoints_count_exactly() -> None:
    base = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 1,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 1000, "max_position_embeddings": 4096}  # fmt: skip
    fp8 = _facts(
        {**base, "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8}}}}},
        {"model.embed_tokens.weight": ("BF16", [1000, 4096]),
         "model.layers.0.mlp.down_proj.weight": ("F8_E4M3", [4096, 14336]),
         "model.layers.0.mlp.down_proj.weight_scale": ("F32", [4096, 1]),
         "model.layers.0.mlp.down_proj.input_scale": ("F32", [1])},
    )  # fmt: skip
    plan = plan_from_facts(fp8)
    assert plan.parameters == 1000 * 4096 + 4096 * 14336
    assert plan.weight_bytes == 1000 * 4096 * 2 + 4096 * 14336 + 4096 * 4 + 4
    assert plan.checkpoint_quantization == "compressed-tensors"
    bnb = _facts(
        {**base, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
        {"model.layers.0.mlp.down_proj.weight": ("U8", [4096 * 14336 // 2, 1]),
         "model.layers.0.mlp.down_proj.weight.absmax": ("F32", [4096 * 14336 // 64]),
         "model.layers.0.mlp.down_proj.weight.quant_map": ("F32", [16])},
    )  # fmt: skip
    plan = plan_from_facts(bnb)
    assert plan.parameters == 4096 * 14336
    assert plan.weight_bytes == 4096 * 14336 // 2 + 4096 * 14336 // 64 * 4 + 64


def test_summary_is_compact() -> None:
    plan = plan_from_facts(facts("llama-3.1-70b"), gpu="H100", tensor_parallel_size="auto", max_model_len="auto")
    digest = plan.summary()
    assert len(json.dumps(digest)) < 1024
    assert digest["fits"] is True and digest["chosen"]["tensorParallelSize"] == plan.tensor_parallel_size
