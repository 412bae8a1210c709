"""The memory planner's LoRA term (``vllm_runtime.planner.lora``): vLLM's stacked LoRA buffers and extra
activations, by hand for the tiny Llama, how they scale, and plans refused when they do not fit."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_runtime.planner import LoraSpec, check_gpu_before_start, lora_memory, plan_from_facts
from vllm_runtime.planner.sources import load_model

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 512,
        "torch_dtype": "float32"}  # fmt: skip
GiB = 1024**3


def test_tiny_llama_buffers_by_hand() -> None:
    m = lora_memory(TINY, max_loras=2, max_lora_rank=8, max_num_batched_tokens=256, max_num_seqs=16)
    # per layer, elements of lora_a (r x in) + lora_b (out x r) per slice; q/k/v out = 4 x 32 = 128
    qkv = 3 * 8 * 64 + 3 * 128 * 8
    o = 8 * 128 + 64 * 8
    gate_up = 2 * 8 * 64 + 2 * 128 * 8
    down = 8 * 128 + 64 * 8
    embeddings = 2 * (512 * 8 + 64 * 8)  # embed_tokens and lm_head
    assert m.weights_bytes == 4 * 2 * (2 * (qkv + o + gate_up + down) + embeddings)
    assert m.activation_bytes == 3 * 256 * 8 * 4 + 4 * 256 * 8 + 16 * 8 * 4
    assert m.total_bytes == m.weights_bytes + m.activation_bytes
    assert m.modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")


def test_scales_with_max_loras_and_rank_not_with_the_adapters() -> None:
    one = lora_memory(TINY, max_loras=1, max_lora_rank=8)
    assert lora_memory(TINY, max_loras=4, max_lora_rank=8).weights_bytes == 4 * one.weights_bytes
    assert lora_memory(TINY, max_loras=1, max_lora_rank=32).weights_bytes == 4 * one.weights_bytes
    narrowed = lora_memory(TINY, max_loras=1, max_lora_rank=8, target_modules=["q_proj", "v_proj"])
    assert narrowed.modules == ("qkv_proj",)  # a packed module is wrapped whole
    assert narrowed.weights_bytes == 4 * 2 * (3 * 8 * 64 + 3 * 128 * 8)
    assert lora_memory(TINY, max_loras=1, max_lora_rank=8, dtype="bfloat16").weights_bytes * 2 == one.weights_bytes
    host = lora_memory(TINY, max_loras=2, max_lora_rank=8, max_cpu_loras=5, adapter_bytes=1000)
    assert host.host_bytes == 5000 and one.host_bytes is None
    with pytest.raises(ValueError, match="maxLoras"):
        lora_memory(TINY, max_loras=0, max_lora_rank=8)


def test_tensor_parallel_shards_the_buffers() -> None:
    cfg = {**TINY, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 32, "vocab_size": 128256,
           "torch_dtype": "bfloat16"}  # fmt: skip  (Llama-3-8B's shapes)
    tp1 = lora_memory(cfg, max_loras=4, max_lora_rank=16)
    tp2 = lora_memory(cfg, max_loras=4, max_lora_rank=16, tensor_parallel_size=2)
    assert 0.5 * tp1.weights_bytes < tp2.weights_bytes < tp1.weights_bytes
    # Llama-3-8B, 4 adapters of rank 16: about 0.3 GiB of buffers (order of magnitude vLLM users report)
    assert 0.1 * GiB < tp1.weights_bytes < 0.5 * GiB


@pytest.fixture(scope="module")
def tiny_facts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from vllm_runtime.devhub.tiny_model import generate

    return load_model(str(generate(tmp_path_factory.mktemp("tiny"))))


def test_plan_counts_lora_in_the_overhead_and_refuses_what_cannot_fit(tiny_facts: Any) -> None:
    plain = plan_from_facts(tiny_facts, gpu_memory_bytes=8 * GiB, max_model_len=256)
    spec = LoraSpec(max_loras=4, max_lora_rank=64)
    with_lora = plan_from_facts(tiny_facts, gpu_memory_bytes=8 * GiB, max_model_len=256, lora=spec)
    assert plain.overhead is not None and with_lora.overhead is not None
    expected = lora_memory(tiny_facts.config, max_loras=4, max_lora_rank=64,
                           max_num_batched_tokens=plain.overhead.max_num_batched_tokens,
                           max_num_seqs=plain.overhead.max_num_seqs).total_bytes  # fmt: skip
    assert with_lora.overhead.lora == expected > 0
    assert with_lora.overhead_bytes_per_gpu == plain.overhead_bytes_per_gpu + expected  # type: ignore[operator]
    assert with_lora.kv_cache_bytes_per_gpu == plain.kv_cache_bytes_per_gpu - expected  # type: ignore[operator]
    assert with_lora.summary()["loraBytesPerGPU"] == expected and "loraBytesPerGPU" not in plain.summary()
    # A GPU that holds the model but not 512 rank-512 adapters: refused at plan time.
    assert plan_from_facts(tiny_facts, gpu_memory_bytes=1 * GiB, max_model_len=256).fits is True
    huge = LoraSpec(max_loras=512, max_lora_rank=512)
    refused = plan_from_facts(tiny_facts, gpu_memory_bytes=1 * GiB, max_model_len=256, lora=huge)
    assert refused.fits is False and "overhead" in refused.reason


def test_gpu_check_before_start_uses_the_serve_lora_settings(tiny_facts: Any, tmp_path: Any) -> None:
    from vllm_runtime.devhub.tiny_model import generate

    model = generate(tmp_path / "m")
    settings = {"gpuMemoryUtilization": 0.9, "maxModelLen": 256}
    free = [1 * GiB]
    assert check_gpu_before_start(model, settings, free_bytes=free, total_bytes=free).ok
    lora = {**settings, "enableLora": True, "maxLoras": 512, "maxLoraRank": 512}
    verdict = check_gpu_before_start(model, lora, free_bytes=free, total_bytes=free)
    assert not verdict.ok and verdict.plan is not None and verdict.plan.overhead is not None
    assert verdict.plan.overhead.lora > 0
