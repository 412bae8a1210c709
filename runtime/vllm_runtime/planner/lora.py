"""GPU memory a server with LoRA adapters needs on top of the base model (vLLM 0.32's allocations).

With ``--enable-lora`` vLLM wraps, before any adapter is loaded, every linear layer the model supports
(``--lora-target-modules`` narrows it) and the embeddings, and allocates for each wrapped module
``max_loras`` slots of ``lora_a`` (rank x in) and ``lora_b`` (out x rank) at the model's dtype
(``lora/layers/base_linear.py``, ``vocab_parallel_embedding.py``, ``logits_processor.py``). Those buffers
do not depend on which adapters are loaded: ``max_loras x max_lora_rank x the modules' shapes`` is the
whole cost, paid at start. On top, each wrapped layer's forward needs a float32 ``(slices, tokens, rank)``
shrink buffer and the punica wrapper keeps four int64 index tensors of ``max_num_batched_tokens``
(``lora/punica_wrapper``): that is the extra activation memory. Adapters kept in host memory
(``max_cpu_loras``) cost host RAM, not GPU memory.

``lora_memory`` is what the operator's memory step calls (with the base model's config.json);
``plan_from_facts(..., lora=LoraSpec(...))`` adds it to the plan's overhead, so a plan that cannot hold
the LoRA buffers is refused before anything starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import arch

# (module, packed slices, column-parallel) of a Llama-family decoder layer as vLLM packs them.
LINEAR_MODULES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj"), True),
    ("o_proj", ("o_proj",), False),
    ("gate_up_proj", ("gate_proj", "up_proj"), True),
    ("down_proj", ("down_proj",), False),
)
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4}
PUNICA_INDEX_TENSORS = 4  # token, sampler, sampler padded, embeddings indices (int64 each)


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA limits vLLM starts with (``--max-loras``, ``--max-lora-rank``, ``--max-cpu-loras``)."""

    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None = None
    target_modules: tuple[str, ...] | None = None  # --lora-target-modules; None: every supported module
    adapter_bytes: int | None = None  # the largest adapter's file size, for the host-memory estimate


@dataclass(frozen=True)
class LoraMemory:
    weights_bytes: int  # the stacked lora_a/lora_b buffers on one GPU
    activation_bytes: int  # the extra peak of a forward pass with LoRA, one GPU
    host_bytes: int | None  # adapters kept in host memory (max_cpu_loras x the largest adapter)
    modules: tuple[str, ...]  # what vLLM wraps
    max_loras: int
    max_lora_rank: int

    @property
    def total_bytes(self) -> int:
        """GPU memory per GPU: what the plan's overhead gains."""
        return self.weights_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "modules": list(self.modules), "total_bytes": self.total_bytes}

    def summary(self) -> dict[str, Any]:
        """camelCase, for status and the termination message."""
        return {"loraBytesPerGPU": self.total_bytes, "loraWeightsBytes": self.weights_bytes,
                "loraActivationBytes": self.activation_bytes, "loraHostBytes": self.host_bytes,
                "maxLoras": self.max_loras, "maxLoraRank": self.max_lora_rank}  # fmt: skip


def _dtype_bytes(config: dict[str, Any], dtype: str | None) -> int:
    name = dtype or str(arch.text_config(config).get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
    return DTYPE_BYTES.get(name.replace("torch.", ""), 2)


def _wanted(slices: Sequence[str], packed: str, targets: tuple[str, ...] | None) -> int:
    """How many of a packed module's slices are wrapped (all of them when any is targeted)."""
    if targets is None:
        return len(slices)
    return len(slices) if packed in targets or any(s in targets for s in slices) else 0


def lora_memory(
    config: dict[str, Any],
    *,
    max_loras: int,
    max_lora_rank: int,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
    target_modules: Sequence[str] | None = None,
    max_cpu_loras: int | None = None,
    adapter_bytes: int | None = None,
) -> LoraMemory:
    """GPU memory per GPU for vLLM's LoRA buffers and activations with these limits (see the module doc).

    ``config`` is the base model's config.json. Raises ValueError for limits vLLM refuses."""
    if max_loras < 1:
        raise ValueError(f"maxLoras must be at least 1, got {max_loras}")
    if max_lora_rank < 1:
        raise ValueError(f"maxLoraRank must be positive, got {max_lora_rank}")
    cfg = arch.text_config(config)
    tp = max(1, tensor_parallel_size)
    h = int(arch.first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(arch.first(cfg, "num_attention_heads", "n_head", default=1))
    kv_heads = int(arch.first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(arch.first(cfg, "head_dim", default=0) or (h // max(1, heads)))
    inter = int(arch.first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h))
    layers = int(arch.first(cfg, "num_hidden_layers", "n_layer", default=0))
    vocab = int(arch.first(cfg, "vocab_size", default=32000))
    q, kv = heads * head_dim, kv_heads * head_dim
    slice_out = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": inter, "up_proj": inter,
                 "down_proj": h}  # fmt: skip
    fan_in = {"qkv_proj": h, "o_proj": q, "gate_up_proj": h, "down_proj": inter}
    targets = tuple(target_modules) if target_modules is not None else None
    r, n = max_lora_rank, max_loras
    elements = 0
    wrapped: list[str] = []
    widest = 0
    for packed, slices, column in LINEAR_MODULES:
        count = _wanted(slices, packed, targets)
        if not count:
            continue
        wrapped.append(packed)
        widest = max(widest, count)
        for s in slices:
            # column-parallel: lora_a whole (r x in), lora_b sharded (out/tp x r); row-parallel the other way.
            a = r * fan_in[packed] if column else r * math.ceil(fan_in[packed] / tp)
            b = (math.ceil(slice_out[s] / tp) if column else slice_out[s]) * r
            elements += layers * n * (a + b)
    for module in EMBEDDING_MODULES:
        if targets is None or module in targets:
            wrapped.append(module)
            elements += n * (math.ceil(vocab / tp) * r + h * r)  # embed: vocab x r, h x r; lm_head: r x h, vocab x r
    weights = elements * _dtype_bytes(config, dtype)
    # Peak extra activations: one wrapped layer's float32 shrink buffer at a time, the index tensors, and the
    # sampler-side LoRA logits buffer for max_num_seqs rows.
    activations = (
        widest * max_num_batched_tokens * r * 4
        + PUNICA_INDEX_TENSORS * max_num_batched_tokens * 8
        + max_num_seqs * r * 4
    )
    host = None
    if adapter_bytes is not None:
        host = max(max_cpu_loras or n, n) * adapter_bytes
    return LoraMemory(weights, activations, host, tuple(wrapped), n, r)
