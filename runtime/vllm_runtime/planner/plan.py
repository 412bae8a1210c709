"""The memory plan: weights + overhead + KV cache against GPU memory x utilization x tensor parallelism.

Per GPU, vLLM takes ``total_memory * gpu_memory_utilization`` as its budget, loads its share of the
weights, profiles a forward pass (the activation peak), reserves CUDA graphs, and gives what is left
to the KV cache in blocks of ``block_size`` tokens. The plan mirrors that arithmetic; the overhead
(activations, CUDA graphs, runtime) is an estimate and is reported as its own term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import arch, gpus, quant
from .lora import LoraSpec, lora_memory
from .sources import ModelFacts, load_model

GiB = gpus.GiB
MiB = gpus.MiB
TP_CANDIDATES = (1, 2, 4, 8)


@dataclass
class Overhead:
    """Memory per GPU inside vLLM's budget that is neither weights nor KV cache (estimates)."""

    activations: int  # peak of the profiling forward pass + sampler logits
    cuda_graphs: int  # captured graphs' memory pool (0 with enforceEager)
    runtime: int  # cuBLAS/NCCL workspaces, sampler buffers, allocator slack
    max_num_batched_tokens: int
    max_num_seqs: int
    lora: int = 0  # LoRA buffers and their activations (planner.lora), 0 without adapters

    @property
    def total(self) -> int:
        return self.activations + self.cuda_graphs + self.runtime + self.lora


@dataclass
class Plan:
    model: str
    revision: str | None
    commit: str | None
    source: str
    gpu: str | None
    gpu_memory_bytes: int | None
    gpu_memory_utilization: float
    tensor_parallel_size: int
    parameters: int
    weight_bytes: int  # as stored in the safetensors files (exact, from the headers)
    weight_bytes_allocated: int  # on one GPU, with the CUDA caching allocator's rounding
    weight_bytes_per_gpu: int
    weight_bytes_by_dtype: dict[str, int]
    quantization: str | None
    checkpoint_quantization: str | None
    kv_cache_dtype: str
    attention: str
    kv_cache_bytes_per_token: int  # whole model (all ranks), every attention layer
    kv_cache_bytes_per_token_per_gpu: int
    overhead: Overhead | None
    overhead_bytes_per_gpu: int | None
    budget_bytes_per_gpu: int | None
    kv_cache_bytes_per_gpu: int | None
    kv_cache_bytes: int | None  # all GPUs together
    block_size: int
    num_blocks: int | None
    model_max_len: int | None  # what the config allows
    max_model_len: int | None  # what the plan serves (chosen when "auto")
    max_model_len_that_fits: int | None
    max_tokens_in_flight: int | None
    max_concurrent_sequences: int | None
    fits: bool | None
    reason: str
    suggestions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    chosen: dict[str, int] = field(default_factory=dict)  # fields filled from "auto"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.overhead is not None:
            out["overhead"] = {**asdict(self.overhead), "total": self.overhead.total}
        return out

    def summary(self) -> dict[str, Any]:
        """A compact camelCase digest for ``status.plan`` and the cache Job's termination message (< 1 KiB)."""
        out: dict[str, Any] = {
            "fits": self.fits,
            "reason": self.reason[:300],
            "gpu": self.gpu,
            "gpuMemoryBytes": self.gpu_memory_bytes,
            "tensorParallelSize": self.tensor_parallel_size,
            "maxModelLen": self.max_model_len,
            "parameters": self.parameters,
            "weightBytes": self.weight_bytes,
            "weightBytesPerGPU": self.weight_bytes_per_gpu,
            "overheadBytesPerGPU": self.overhead_bytes_per_gpu,
            "kvCacheBytesPerToken": self.kv_cache_bytes_per_token,
            "kvCacheBytes": self.kv_cache_bytes,
            "maxTokensInFlight": self.max_tokens_in_flight,
            "maxConcurrentSequences": self.max_concurrent_sequences,
            "suggestions": [s[:200] for s in self.suggestions[:3]],
        }
        if self.overhead is not None and self.overhead.lora:
            out["loraBytesPerGPU"] = self.overhead.lora
        if self.chosen:
            out["chosen"] = dict(self.chosen)
        return out


def estimate_overhead(
    config: dict[str, Any],
    *,
    gpu_memory_bytes: int,
    tensor_parallel_size: int,
    enforce_eager: bool = False,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
) -> Overhead:
    """Activations at vLLM's default batch limits for this GPU size, CUDA graphs, runtime buffers."""
    cfg = arch.text_config(config)
    tp = max(1, tensor_parallel_size)
    # vLLM's OpenAI-server defaults by device memory (engine/arg_utils.py, 0.32).
    if gpu_memory_bytes >= 160 * GiB:
        tokens, seqs = 16384, 1024
    elif gpu_memory_bytes >= 70 * GiB:
        tokens, seqs = 8192, 1024
    else:
        tokens, seqs = 2048, 256
    tokens = max_num_batched_tokens or tokens
    seqs = max_num_seqs or seqs
    hidden = int(arch.first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(arch.first(cfg, "num_attention_heads", "n_head", default=1))
    kv_heads = int(arch.first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(arch.first(cfg, "head_dim", default=0) or (hidden // max(1, heads)))
    dense = int(arch.first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    topk = int(arch.first(cfg, "num_experts_per_tok", "experts_per_token", "moe_topk", default=0))
    moe = int(arch.first(cfg, "moe_intermediate_size", default=dense))
    mlp = max(dense, topk * moe)
    vocab = int(arch.first(cfg, "vocab_size", default=32000))
    # Per token in flight: residual + normed hidden states, q/k/v, gate+up and the activated product.
    per_token = 2 * (4 * hidden + (heads + 2 * kv_heads) * head_dim // tp + 3 * mlp // tp)
    logits = seqs * vocab * 4 * 2  # fp32 logits for max_num_seqs rows, plus the sampler's copy
    activations = tokens * per_token + logits
    layers = int(arch.first(cfg, "num_hidden_layers", "n_layer", default=0))
    cuda_graphs = 0 if enforce_eager else 256 * MiB + layers * 10 * MiB
    # NCCL and custom all-reduce buffers: vLLM's own profiling of Llama-3-8B on an H100 showed non-torch
    # memory going from 1.79 GiB at TP 1 to 3.58 GiB at TP 2 (vllm-project/vllm#10511).
    runtime = 512 * MiB + (1792 * MiB if tp > 1 else 0)
    return Overhead(activations, cuda_graphs, runtime, tokens, seqs)


@dataclass
class _Fit:
    tp: int
    weights: quant.WeightCount
    geometry: arch.KvGeometry
    weight_per_gpu: int
    overhead: Overhead
    budget: int
    kv_room: int
    num_blocks: int
    max_len_fits: int
    max_len: int | None
    blocks_per_seq: int
    tokens_in_flight: int
    concurrent: int
    fits: bool
    reason: str


def _round_len(n: int) -> int:
    """A friendly length: multiples of 1024 above 4096, of 256 above 256."""
    if n >= 4096:
        return n // 1024 * 1024
    if n >= 256:
        return n // 256 * 256
    return n


def _evaluate(
    facts: ModelFacts,
    weights: quant.WeightCount,
    *,
    gpu_memory_bytes: int,
    utilization: float,
    tp: int,
    kv_cache_dtype: str | None,
    max_model_len: int | Literal["auto"] | None,
    block_size: int,
    enforce_eager: bool,
    kv_cache_memory_bytes: int | None,
    max_num_batched_tokens: int | None,
    max_num_seqs: int | None,
    lora: LoraSpec | None = None,
) -> _Fit:
    config = facts.config
    geometry = arch.kv_geometry(config, kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tp)
    weight_per_gpu = weights.bytes_per_gpu(tp)
    overhead = estimate_overhead(
        config,
        gpu_memory_bytes=gpu_memory_bytes,
        tensor_parallel_size=tp,
        enforce_eager=enforce_eager,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
    )
    if lora is not None:
        overhead.lora = lora_memory(
            config, max_loras=lora.max_loras, max_lora_rank=lora.max_lora_rank, tensor_parallel_size=tp,
            max_num_batched_tokens=overhead.max_num_batched_tokens, max_num_seqs=overhead.max_num_seqs,
            target_modules=lora.target_modules,
        ).total_bytes  # fmt: skip
    budget = math.ceil(gpu_memory_bytes * utilization)
    if kv_cache_memory_bytes is not None:
        kv_room = kv_cache_memory_bytes  # vLLM's --kv-cache-memory-bytes skips the profiling arithmetic
    else:
        kv_room = budget - weight_per_gpu - overhead.total
    num_blocks = geometry.num_blocks(max(0, kv_room), block_size)
    model_max = arch.derived_max_model_len(config) or 2048
    batched = overhead.max_num_batched_tokens
    max_len_fits = geometry.max_len_for_blocks(num_blocks, block_size, batched, model_max) if num_blocks else 0
    if max_model_len == "auto":
        length: int | None = model_max if max_len_fits >= model_max else _round_len(max_len_fits) or None
    else:
        length = max_model_len or model_max
    blocks_per_seq = geometry.blocks_per_sequence(length or 1, block_size, batched)
    full_groups = max(1, sum(1 for g in geometry.groups if g.kind != "sliding"))
    tokens_in_flight = num_blocks * block_size // full_groups
    concurrent = num_blocks // blocks_per_seq if blocks_per_seq and length else 0

    gib = _gib
    if kv_cache_memory_bytes is None and weight_per_gpu > budget:
        reason = (
            f"weights need {gib(weight_per_gpu)} per GPU but only {gib(budget)} of {gib(gpu_memory_bytes)} "
            f"are usable at gpuMemoryUtilization {utilization} with tensorParallelSize {tp}"
        )
        fits = False
    elif kv_room <= 0 or num_blocks == 0:
        reason = (
            f"after {gib(weight_per_gpu)} of weights and {gib(overhead.total)} of overhead per GPU, "
            f"no memory is left for the KV cache (budget {gib(budget)})"
        )
        fits = False
    elif length is None or concurrent < 1:
        need = geometry.bytes_per_block(block_size) * blocks_per_seq
        reason = (
            f"one sequence of maxModelLen {length} tokens needs {gib(need)} of KV cache per GPU, but only "
            f"{gib(kv_room)} is left after {gib(weight_per_gpu)} of weights and {gib(overhead.total)} of overhead; "
            f"the longest that fits is {max_len_fits} tokens"
        )
        fits = False
    else:
        room = (
            f"{gib(kv_room)} of KV cache (fixed by kv_cache_memory_bytes)"
            if kv_cache_memory_bytes is not None
            else f"{gib(weight_per_gpu)} weights + {gib(overhead.total)} overhead per GPU leave {gib(kv_room)} of KV cache"
        )
        reason = f"fits: {room}, {tokens_in_flight} tokens in flight = {concurrent} concurrent sequences of {length} tokens"
        fits = True
    if length is not None and length > model_max:
        fits = False
        reason = (
            f"maxModelLen {length} is longer than the model's context ({model_max} from config.json); "
            "vLLM refuses it: use at most that"
        )
    return _Fit(
        tp, weights, geometry, weight_per_gpu, overhead, budget, kv_room, num_blocks, max_len_fits, length,
        blocks_per_seq, tokens_in_flight, concurrent, fits, reason,
    )  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _tp_candidates(config: dict[str, Any]) -> list[int]:
    heads = int(arch.first(arch.text_config(config), "num_attention_heads", "n_head", default=1))
    return [tp for tp in TP_CANDIDATES if heads % tp == 0]


def plan_from_facts(
    facts: ModelFacts,
    *,
    gpu: str | None = None,
    gpu_memory_bytes: int | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    max_model_len: int | Literal["auto"] | None = None,
    tensor_parallel_size: int | Literal["auto"] = 1,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
    block_size: int = arch.DEFAULT_GPU_BLOCK_SIZE,
    kv_cache_memory_bytes: int | None = None,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
    lora: LoraSpec | None = None,
) -> Plan:
    """Plan from already-read facts (see ``plan_model`` for the arguments; ``lora``: the adapters' limits)."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpuMemoryUtilization must be in (0, 1], got {gpu_memory_utilization}")
    if isinstance(max_model_len, int) and max_model_len < 1:
        raise ValueError(f"maxModelLen must be a positive integer or 'auto', got {max_model_len}")
    if isinstance(tensor_parallel_size, int) and tensor_parallel_size < 1:
        raise ValueError(f"tensorParallelSize must be a positive integer or 'auto', got {tensor_parallel_size}")
    gpu_name = None
    if gpu:
        gpu_type = gpus.gpu_type(gpu)
        gpu_name, gpu_memory_bytes = gpu_type.name, gpu_type.memory_bytes
    weights, problems = quant.weights_under(facts.tensors, facts.config, quantization)
    if weights.weight_bytes == quant.count_weights(facts.tensors, facts.config).weight_bytes:
        allocated = quant.cuda_allocated_bytes(quant.tensor_bytes(facts.tensors, facts.load_order()))
    else:  # quantized while loading: the stored layout says nothing about the allocations
        allocated = weights.weight_bytes
    # Per-GPU shares carry the same allocator rounding as the whole.
    scale = allocated / weights.weight_bytes if weights.weight_bytes else 1.0
    weights.sharded_bytes = math.ceil(weights.sharded_bytes * scale)
    weights.replicated_bytes = math.ceil(weights.replicated_bytes * scale)
    warnings = [*facts.notes, *weights.notes, *problems]
    geometry1 = arch.kv_geometry(facts.config, kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=1)
    warnings += geometry1.unsupported
    model_max = arch.derived_max_model_len(facts.config)
    common = dict(
        quantization=quantization or weights.quant_method,
        checkpoint_quantization=quant.checkpoint_method(facts.config),
        kv_cache_dtype=geometry1.kv_dtype,
        attention=geometry1.attention,
        kv_cache_bytes_per_token=geometry1.bytes_per_token(),
        block_size=block_size,
        model_max_len=model_max,
    )
    base = dict(
        model=facts.model,
        revision=facts.revision,
        commit=facts.commit,
        source=facts.source,
        gpu=gpu_name,
        gpu_memory_bytes=gpu_memory_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        parameters=weights.parameters,
        weight_bytes=weights.weight_bytes,
        weight_bytes_allocated=allocated,
        weight_bytes_by_dtype=weights.bytes_by_dtype,
    )
    if gpu_memory_bytes is None and kv_cache_memory_bytes is None:
        tp = tensor_parallel_size if isinstance(tensor_parallel_size, int) else 1
        geometry = arch.kv_geometry(facts.config, kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tp)
        return Plan(
            **base, **common,  # type: ignore[arg-type]
            tensor_parallel_size=tp, weight_bytes_per_gpu=weights.bytes_per_gpu(tp),
            kv_cache_bytes_per_token_per_gpu=geometry.bytes_per_token(), overhead=None, overhead_bytes_per_gpu=None,
            budget_bytes_per_gpu=None, kv_cache_bytes_per_gpu=None, kv_cache_bytes=None, num_blocks=None,
            max_model_len=max_model_len if isinstance(max_model_len, int) else model_max,
            max_model_len_that_fits=None, max_tokens_in_flight=None, max_concurrent_sequences=None, fits=None,
            reason="no GPU given: pass a GPU type (--gpu / spec.gpu.type) or memory size for a verdict",
            warnings=warnings,
        )  # fmt: skip
    memory = gpu_memory_bytes if gpu_memory_bytes is not None else 0

    def evaluate(tp: int, **override: Any) -> _Fit:
        args: dict[str, Any] = dict(
            gpu_memory_bytes=memory, utilization=gpu_memory_utilization, tp=tp, kv_cache_dtype=kv_cache_dtype,
            max_model_len=max_model_len, block_size=block_size, enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_memory_bytes, max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, lora=lora,
        )  # fmt: skip
        args.update(override)
        w = args.pop("weights", weights)
        return _evaluate(facts, w, **args)

    chosen: dict[str, int] = {}
    candidates = _tp_candidates(facts.config)
    if tensor_parallel_size == "auto":
        fit = next((f for f in (evaluate(tp) for tp in candidates) if f.fits), None) or evaluate(1)
        chosen["tensorParallelSize"] = fit.tp
    else:
        fit = evaluate(int(tensor_parallel_size))
        if fit.tp not in candidates and fit.tp > 1:
            fit.fits = False
            fit.reason = (
                f"tensorParallelSize {fit.tp} must divide the model's {arch.first(arch.text_config(facts.config), 'num_attention_heads')} "
                f"attention heads: use one of {', '.join(map(str, candidates))}"
            )
    if max_model_len == "auto" and fit.max_len:
        chosen["maxModelLen"] = fit.max_len
    blocking = [p for p in problems if "refuses" in p or "needs a checkpoint" in p]
    if blocking:
        fit.fits = False
        fit.reason = blocking[0]
    suggestions = [] if fit.fits else _suggestions(facts, fit, evaluate, candidates, weights, kv_cache_dtype, gpu_memory_utilization, kv_cache_memory_bytes)  # fmt: skip
    if fit.fits and fit.max_len and fit.concurrent < 4:
        warnings.append(
            f"only {fit.concurrent} sequence(s) of {fit.max_len} tokens fit at once; a shorter maxModelLen, "
            "an fp8 KV cache or more GPUs raise concurrency"
        )
    if kv_cache_memory_bytes is None and memory and memory * (1 - gpu_memory_utilization) < 0.75 * GiB:
        warnings.append(
            "less than 0.75 GiB is left outside gpuMemoryUtilization for the CUDA context and other processes"
        )
    return Plan(
        **base, **common,  # type: ignore[arg-type]
        tensor_parallel_size=fit.tp,
        weight_bytes_per_gpu=fit.weight_per_gpu,
        kv_cache_bytes_per_token_per_gpu=fit.geometry.bytes_per_token(),
        overhead=None if kv_cache_memory_bytes is not None else fit.overhead,
        overhead_bytes_per_gpu=None if kv_cache_memory_bytes is not None else fit.overhead.total,
        budget_bytes_per_gpu=fit.budget if memory else None,
        kv_cache_bytes_per_gpu=max(0, fit.kv_room),
        kv_cache_bytes=max(0, fit.kv_room) * fit.tp,
        num_blocks=fit.num_blocks,
        max_model_len=fit.max_len,
        max_model_len_that_fits=fit.max_len_fits,
        max_tokens_in_flight=fit.tokens_in_flight,
        max_concurrent_sequences=fit.concurrent,
        fits=fit.fits,
        reason=fit.reason,
        suggestions=suggestions,
        warnings=warnings,
        chosen=chosen,
    )  # fmt: skip


def _suggestions(
    facts: ModelFacts,
    fit: _Fit,
    evaluate: Any,
    candidates: list[int],
    weights: quant.WeightCount,
    kv_cache_dtype: str | None,
    utilization: float,
    kv_cache_memory_bytes: int | None,
) -> list[str]:
    """Concrete changes that would fit, each checked with the same arithmetic."""
    out: list[str] = []
    wanted = fit.max_len or 0
    # A shorter context is worth suggesting down to this length; below it the change alone is not enough.
    useful_len = min(wanted, 4096) if wanted else 4096

    def describe(alt: _Fit, words: str) -> str | None:
        if alt.fits:
            return f"{words}: {alt.concurrent} sequences of {alt.max_len} tokens fit"
        if alt.weight_per_gpu <= alt.budget and alt.max_len_fits >= useful_len:
            shorter = _round_len(alt.max_len_fits)
            return f"{words}, with maxModelLen {shorter} (the longest that fits is {alt.max_len_fits})"
        return None

    weights_fit = fit.weight_per_gpu <= fit.budget and fit.num_blocks > 0
    if weights_fit and 0 < fit.max_len_fits < wanted:
        out.append(f"set maxModelLen to {_round_len(fit.max_len_fits)} or less (the longest that fits is {fit.max_len_fits})")
    options: list[tuple[_Fit, str]] = []
    if fit.geometry.kv_dtype_bytes > 1 and not fit.geometry.unsupported:
        options.append((evaluate(fit.tp, kv_cache_dtype="fp8"), "set kvCacheDtype fp8 (half the KV cache per token)"))
    if kv_cache_memory_bytes is None and utilization < 0.95:
        options.append((evaluate(fit.tp, utilization=0.95), "raise gpuMemoryUtilization to 0.95 (if nothing else uses the GPU)"))
    for tp in candidates:
        if tp > fit.tp:
            alt = evaluate(tp)
            if describe(alt, "") is not None:
                options.append((alt, f"use tensorParallelSize {tp} ({tp} GPUs, {_gib(alt.weight_per_gpu)} of weights each)"))
                break
    if weights.quant_method is None and kv_cache_memory_bytes is None:
        fp8 = quant.project_weights(facts.tensors, facts.config, bits=8, group_size=None)
        int4 = quant.project_weights(facts.tensors, facts.config, bits=4, group_size=128)
        options.append((evaluate(fit.tp, weights=fp8), f"set quantization fp8 (quantized while loading; weights {_gib(fp8.weight_bytes)})"))
        options.append((evaluate(fit.tp, weights=int4), f"use a 4-bit AWQ or GPTQ variant of the model (another repo; weights about {_gib(int4.weight_bytes)})"))
    if kv_cache_memory_bytes is None:
        for gpu in sorted(gpus.GPU_TYPES.values(), key=lambda g: g.memory_bytes):
            if gpu.memory_bytes > fit.budget / utilization:
                alt = evaluate(fit.tp, gpu_memory_bytes=gpu.memory_bytes)
                if alt.fits:
                    options.append((alt, f"use a larger GPU: {gpu.name}"))
                    break
    for alt, words in options:
        text = describe(alt, words)
        if text:
            out.append(text)
    if not out:
        out.append("no single change fits: combine a quantized variant with more GPUs, or choose a smaller model")
    return out


def plan_model(
    model: str,
    *,
    revision: str = "main",
    gpu: str | None = None,
    gpu_memory_bytes: int | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    max_model_len: int | Literal["auto"] | None = None,
    tensor_parallel_size: int | Literal["auto"] = 1,
    gpu_memory_utilization: float = 0.9,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    enforce_eager: bool = False,
    block_size: int = arch.DEFAULT_GPU_BLOCK_SIZE,
    kv_cache_memory_bytes: int | None = None,
    lora: LoraSpec | None = None,
) -> Plan:
    """Plan GPU memory for ``model`` (a Hub repo id or a local directory) before deploying it.

    Reads config.json and the safetensors headers only (from the Hub with HTTP Range requests).
    ``gpu`` names a card from ``gpus.GPU_TYPES``; ``gpu_memory_bytes`` gives the size instead; with
    neither, the plan states the requirements without a verdict (``fits`` is None).
    ``max_model_len=None`` means the model's own context length (vLLM's default); ``"auto"`` picks
    that length if one sequence fits, else the longest that does. ``tensor_parallel_size="auto"``
    picks the fewest GPUs (1, 2, 4, 8) that fit. Hub errors are huggingface_hub's typed errors;
    a model that cannot be read raises ``sources.ModelSourceError``; bad arguments ``ValueError``.
    """
    facts = load_model(model, revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir)
    return plan_from_facts(
        facts,
        gpu=gpu,
        gpu_memory_bytes=gpu_memory_bytes,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        block_size=block_size,
        kv_cache_memory_bytes=kv_cache_memory_bytes,
        lora=lora,
    )


@dataclass
class GpuCheck:
    ok: bool
    reason: str
    plan: Plan | None


def check_gpu_before_start(
    model_dir: str | Path,
    settings: dict[str, Any],
    *,
    free_bytes: Sequence[int],
    total_bytes: Sequence[int],
) -> GpuCheck:
    """Re-check the plan on the real GPUs (NVML) right before vLLM starts.

    ``settings`` are the spec fields as ``vllm_args.settings_from_flags`` returns them
    (gpuMemoryUtilization, tensorParallelSize, maxModelLen, quantization, kvCacheDtype, enforceEager;
    enableLora, maxLoras, maxLoraRank with adapters).
    ``free_bytes``/``total_bytes`` are per visible GPU, as CUDA counts them: NVML v2
    ``nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2)`` gives ``free`` and ``total - reserved``
    (NVML's plain total includes the driver's reservation, which vLLM never sees). Fails when a GPU has less free memory than
    vLLM will request (total x utilization: vLLM would refuse to start), or when the plan on the
    smallest GPU does not fit; the reason carries the plan's explanation and suggestions.
    """
    utilization = float(settings.get("gpuMemoryUtilization") or 0.9)
    tp = int(settings.get("tensorParallelSize") or 1)
    if len(free_bytes) < tp:
        return GpuCheck(False, f"tensorParallelSize {tp} needs {tp} GPUs but {len(free_bytes)} are visible", None)
    free, total = list(free_bytes)[:tp], list(total_bytes)[:tp]
    for i, (f, t) in enumerate(zip(free, total, strict=True)):
        wanted = math.ceil(t * utilization)
        if f < wanted:
            return GpuCheck(
                False,
                f"GPU {i} has {_gib(f)} free but vLLM will request {_gib(wanted)} "
                f"(gpuMemoryUtilization {utilization} x {_gib(t)}): another process holds GPU memory; "
                f"lower gpuMemoryUtilization to {max(0.05, f / t - 0.01):.2f} or free the GPU",
                None,
            )
    max_len = settings.get("maxModelLen")
    plan = plan_model(
        str(model_dir),
        gpu_memory_bytes=min(total),
        quantization=settings.get("quantization"),
        kv_cache_dtype=settings.get("kvCacheDtype"),
        max_model_len=int(max_len) if max_len not in (None, "auto") else None,
        tensor_parallel_size=tp,
        gpu_memory_utilization=utilization,
        enforce_eager=bool(settings.get("enforceEager")),
        lora=LoraSpec(int(settings.get("maxLoras") or 1), int(settings.get("maxLoraRank") or 16))
        if settings.get("enableLora") else None,
    )
    if plan.fits is False:
        return GpuCheck(False, plan.reason + ("; try: " + "; ".join(plan.suggestions) if plan.suggestions else ""), plan)
    return GpuCheck(True, plan.reason, plan)
