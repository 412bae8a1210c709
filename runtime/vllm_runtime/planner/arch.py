"""KV cache geometry from config.json: what one token costs in each attention layer.

Covers multi-head and grouped-query attention (K and V per KV head), multi-head latent attention
(DeepSeek: one compressed latent of ``kv_lora_rank + qk_rope_head_dim`` per token, shared by all
heads and replicated on every tensor-parallel rank), and sliding-window layers (Mistral v0.1,
gpt-oss and Gemma alternate them with full attention), laid out the way vLLM's KV cache manager
allocates them: fixed-size blocks of ``block_size`` tokens, one shared pool of blocks per GPU.
What it cannot estimate (state-space and linear-attention layers) is reported in ``unsupported``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# vLLM's --kv-cache-dtype values -> bytes per element ("auto" follows the model dtype).
KV_DTYPE_BYTES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "fp8_ds_mla": 1,
}
# Model dtypes (config.json torch_dtype) -> bytes vLLM computes in; float32 checkpoints run in 16 bits.
MODEL_DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 2, "float": 2, "half": 2}

DEFAULT_GPU_BLOCK_SIZE = 16  # vLLM's block size on CUDA
_STATE_SPACE_KEYS = ("layers_block_type", "hybrid_override_pattern", "ssm_cfg", "mamba_d_state", "linear_num_value_heads")
_STATE_SPACE_TYPES = {"mamba", "mamba2", "jamba", "falcon_h1", "nemotron_h", "zamba2", "bamba", "qwen3_next", "rwkv"}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config (multimodal models nest it as ``text_config``)."""
    inner = config.get("text_config")
    if isinstance(inner, dict):
        return {**config, **inner}
    return config


def first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class LayerGroup:
    """Attention layers that cost the same per token (vLLM puts each kind in its own KV cache group)."""

    kind: str  # full | sliding | mla
    num_layers: int
    bytes_per_token_per_layer: int  # per GPU, at the chosen KV dtype
    window: int | None = None


@dataclass
class KvGeometry:
    groups: list[LayerGroup]
    kv_dtype: str
    kv_dtype_bytes: int
    attention: str  # MHA | GQA | MQA | MLA, plus "+sliding" when some layers slide
    num_kv_heads: int
    kv_heads_per_gpu: int
    head_dim: int
    unsupported: list[str] = field(default_factory=list)

    def bytes_per_token(self, *, include_sliding: bool = True) -> int:
        """KV bytes one token costs on one GPU (sliding layers only while inside their window)."""
        return sum(
            g.num_layers * g.bytes_per_token_per_layer
            for g in self.groups
            if include_sliding or g.kind != "sliding"
        )

    def _grouping(self) -> tuple[int, list[tuple[LayerGroup, int]]]:
        """vLLM's hybrid allocator: groups of ``group_size`` layers share one block id space."""
        counts = [g.num_layers for g in self.groups if g.num_layers > 0]
        if not counts:
            return 1, []
        group_size = min(counts) if len(counts) > 1 else counts[0]
        return group_size, [(g, math.ceil(g.num_layers / group_size)) for g in self.groups if g.num_layers > 0]

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block id: the largest group's pages (vLLM's ``_get_kv_cache_bytes_per_block``)."""
        group_size, groups = self._grouping()
        if not groups:
            return 0
        return max(group_size * g.bytes_per_token_per_layer * block_size for g, _ in groups)

    def num_blocks(self, kv_cache_bytes: int, block_size: int) -> int:
        per_block = self.bytes_per_block(block_size)
        return kv_cache_bytes // per_block if per_block else 0

    def blocks_per_sequence(self, seq_len: int, block_size: int, max_batched_tokens: int) -> int:
        """Block ids one sequence of ``seq_len`` tokens holds across all groups."""
        _, groups = self._grouping()
        total = 0
        for g, n_groups in groups:
            tokens = seq_len
            if g.kind == "sliding" and g.window:
                # vLLM keeps window-1 tokens plus the tokens being prefilled in one step.
                tokens = min(seq_len, g.window - 1 + max_batched_tokens)
            total += n_groups * math.ceil(tokens / block_size)
        return total

    def max_len_for_blocks(self, blocks: int, block_size: int, max_batched_tokens: int, upper: int) -> int:
        """The longest sequence (<= upper) that fits in ``blocks`` block ids; 0 if none."""
        lo, hi, best = 1, upper, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.blocks_per_sequence(mid, block_size, max_batched_tokens) <= blocks:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best


def kv_dtype_bytes(kv_cache_dtype: str | None, config: dict[str, Any]) -> tuple[str, int]:
    """The KV cache element type and its size; ``auto``/None follows the model's dtype."""
    if kv_cache_dtype and kv_cache_dtype != "auto":
        if kv_cache_dtype not in KV_DTYPE_BYTES:
            raise ValueError(
                f"unknown kvCacheDtype {kv_cache_dtype!r}: use auto, {', '.join(sorted(KV_DTYPE_BYTES))}"
            )
        return kv_cache_dtype, KV_DTYPE_BYTES[kv_cache_dtype]
    dtype = str(first(text_config(config), "torch_dtype", "dtype", default="bfloat16"))
    if dtype in ("float32", "float"):
        return "bfloat16", 2  # vLLM's dtype "auto" runs float32 checkpoints in 16 bits
    return dtype, MODEL_DTYPE_BYTES.get(dtype, 2)


def kv_geometry(config: dict[str, Any], *, kv_cache_dtype: str | None = None, tensor_parallel_size: int = 1) -> KvGeometry:
    """Per-GPU KV cache cost per token and per layer for a model config."""
    cfg = text_config(config)
    dtype_name, elem = kv_dtype_bytes(kv_cache_dtype, config)
    unsupported: list[str] = []
    num_layers = int(first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0))
    hidden = int(first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(first(cfg, "num_attention_heads", "n_head", default=0))
    model_type = str(cfg.get("model_type", ""))
    if model_type in _STATE_SPACE_TYPES or any(k in cfg for k in _STATE_SPACE_KEYS):
        unsupported.append(
            f"model_type {model_type!r} has state-space or linear-attention layers: their per-sequence state is "
            "not estimated, so the KV figures count attention layers only"
        )
    if not (num_layers and hidden and heads):
        unsupported.append("config.json lacks num_hidden_layers/hidden_size/num_attention_heads: KV cache not estimated")
        return KvGeometry([], dtype_name, elem, "unknown", 0, 0, 0, unsupported)

    tp = max(1, tensor_parallel_size)
    if cfg.get("kv_lora_rank"):
        latent = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)
        # One latent vector per token, not split across tensor-parallel ranks.
        group = LayerGroup("mla", num_layers, latent * elem)
        return KvGeometry([group], dtype_name, elem, "MLA", 1, 1, latent, unsupported)

    kv_heads = int(first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=0))
    if not kv_heads:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = int(first(cfg, "head_dim", default=0) or hidden // heads)
    kv_per_gpu = max(1, kv_heads // tp)  # vLLM replicates KV heads when tp > kv_heads
    per_layer = 2 * kv_per_gpu * head_dim * elem  # K and V
    attention = "MQA" if kv_heads == 1 else "GQA" if kv_heads < heads else "MHA"

    kinds = layer_kinds(cfg, num_layers)
    window = sliding_window(cfg)
    full = sum(1 for k in kinds if k == "full")
    sliding = sum(1 for k in kinds if k == "sliding")
    groups = []
    if full:
        groups.append(LayerGroup("full", full, per_layer))
    if sliding and window:
        groups.append(LayerGroup("sliding", sliding, per_layer, window))
        attention += "+sliding"
    return KvGeometry(groups, dtype_name, elem, attention, kv_heads, kv_per_gpu, head_dim, unsupported)


def sliding_window(cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return None
    if cfg.get("use_sliding_window") is False:  # Qwen2 carries a window it does not use
        return None
    return window


def layer_kinds(cfg: dict[str, Any], num_layers: int) -> list[str]:
    """'full' or 'sliding' per layer."""
    window = sliding_window(cfg)
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return ["sliding" if window and "sliding" in str(t) else "full" for t in types]
    if not window:
        return ["full"] * num_layers
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:  # Gemma: every pattern-th layer is global
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)]
    if "max_window_layers" in cfg and cfg.get("use_sliding_window"):  # Qwen2: layers from there on slide
        cutoff = int(cfg["max_window_layers"])
        return ["sliding" if i >= cutoff else "full" for i in range(num_layers)]
    return ["sliding"] * num_layers  # Mistral v0.1: every layer slides


def derived_max_model_len(config: dict[str, Any]) -> int | None:
    """The model's context length as vLLM derives it (position embeddings, scaled by RoPE scaling)."""
    cfg = text_config(config)
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length", "max_target_positions")
    lengths = [int(cfg[k]) for k in keys if isinstance(cfg.get(k), int)]
    if not lengths:
        return None
    length = min(lengths)
    scaling = cfg.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type"))
        factor = scaling.get("factor")
        if rope_type == "yarn" and "original_max_position_embeddings" in scaling and factor:
            length = int(scaling["original_max_position_embeddings"] * factor)
        elif rope_type not in (None, "default", "su", "longrope", "llama3", "mrope") and factor:
            length = int(length * factor)
    return length
