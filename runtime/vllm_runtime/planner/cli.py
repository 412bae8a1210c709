"""``vllm-runtime plan``: print the memory plan of a model for a GPU."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import summary
from . import gpus
from .plan import GiB, Plan, plan_model
from .sources import ModelSourceError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="check whether a model fits a GPU, from config.json and safetensors headers only",
        description="Plan GPU memory for a Hub repo or local model directory: weights, overhead, KV cache, verdict.",
    )
    p.add_argument("--model", required=True, help="Hub repo id (org/name) or local model directory")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", help=f"GPU type: {', '.join(gpus.GPU_TYPES)}")
    where.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB, 24GB")
    p.add_argument("--quantization", help="vLLM --quantization method (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", help="auto, fp8, fp8_e4m3, fp8_e5m2, bfloat16, float16")
    p.add_argument("--max-model-len", help="tokens per sequence, or 'auto' (default: the model's context)")
    p.add_argument("--tensor-parallel-size", default="1", help="number of GPUs, or 'auto' (default: 1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction vLLM may use (default 0.9)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (no graph memory)")
    p.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _int_or_auto(value: str | None, flag: str) -> Any:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{flag} must be an integer or 'auto', got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        memory = gpus.parse_memory(args.gpu_memory) if args.gpu_memory else None
        plan = plan_model(
            args.model,
            revision=args.revision,
            gpu=args.gpu,
            gpu_memory_bytes=memory,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=_int_or_auto(args.max_model_len, "--max-model-len"),
            tensor_parallel_size=_int_or_auto(args.tensor_parallel_size, "--tensor-parallel-size") or 1,
            gpu_memory_utilization=args.gpu_memory_utilization,
            endpoint=args.endpoint,
            enforce_eager=args.enforce_eager,
        )
    except (ValueError, ModelSourceError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return summary.EXIT_USAGE if isinstance(exc, ValueError) else summary.EXIT_PERMANENT
    if args.json:
        print(json.dumps(plan.to_dict(), sort_keys=True))
    else:
        print(format_plan(plan))
    return summary.EXIT_OK if plan.fits is not False else summary.EXIT_PERMANENT


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:,.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A table a person can read."""
    rows: list[tuple[str, str]] = [
        ("model", plan.model + (f" @ {plan.commit}" if plan.commit else "")),
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e9:.2f} B)"),
        ("quantization", plan.quantization or "none"),
        ("weights", f"{_gib(plan.weight_bytes)} ({', '.join(f'{k} {_gib(v)}' for k, v in plan.weight_bytes_by_dtype.items())})"),
        ("attention", f"{plan.attention}, KV cache dtype {plan.kv_cache_dtype}"),
        ("KV cache per token", f"{plan.kv_cache_bytes_per_token:,} bytes (model), {plan.kv_cache_bytes_per_token_per_gpu:,} per GPU"),
        ("context (config)", str(plan.model_max_len)),
    ]  # fmt: skip
    if plan.gpu_memory_bytes is not None:
        gpu = plan.gpu or "GPU"
        rows += [
            ("GPUs", f"{plan.tensor_parallel_size} x {gpu} ({_gib(plan.gpu_memory_bytes)}), utilization {plan.gpu_memory_utilization}"),
            ("budget per GPU", _gib(plan.budget_bytes_per_gpu)),
            ("weights per GPU", _gib(plan.weight_bytes_per_gpu)),
        ]  # fmt: skip
        if plan.overhead is not None:
            o = plan.overhead
            rows.append(
                (
                    "overhead per GPU",
                    f"{_gib(o.total)} = activations {_gib(o.activations)} (max {o.max_num_batched_tokens} batched tokens, "
                    f"{o.max_num_seqs} seqs) + CUDA graphs {_gib(o.cuda_graphs)} + runtime {_gib(o.runtime)} [estimate]",
                )
            )
        rows += [
            ("KV cache per GPU", f"{_gib(plan.kv_cache_bytes_per_gpu)} = {plan.num_blocks:,} blocks of {plan.block_size} tokens"),
            ("max model len", f"{plan.max_model_len} (longest that fits: {plan.max_model_len_that_fits})"),
            ("tokens in flight", f"{plan.max_tokens_in_flight:,}"),
            ("concurrent sequences", f"{plan.max_concurrent_sequences} at max model len"),
        ]  # fmt: skip
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "no verdict"}[plan.fits]
    rows.append(("verdict", f"{verdict}: {plan.reason.removeprefix('fits: ')}"))
    if plan.chosen:
        rows.append(("chosen", ", ".join(f"{k}={v}" for k, v in plan.chosen.items())))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"{'suggestion'.ljust(width)}  {s}" for s in plan.suggestions]
    lines += [f"{'warning'.ljust(width)}  {w}" for w in plan.warnings]
    return "\n".join(lines)
