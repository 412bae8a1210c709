"""``vllm-runtime serve --adapters-file``: the flags, the LoRA settings vLLM starts with, the converger thread.

Kept here so ``serve`` only gains a few lines: ``register_serve_arguments`` adds the flags,
``lora_for_serve`` computes vLLM's LoRA settings (None without an adapters file), ``start_converger``
starts the background loop once vLLM runs and adds ``adapters`` to the ``/status`` JSON.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_runtime.adapters.converge import AdapterConverger, VllmAdapterAPI
from vllm_runtime.adapters.desired import AdaptersFileError, read_adapters_file
from vllm_runtime.adapters.settings import LoraSettings, known_ranks, lora_settings

if TYPE_CHECKING:
    from vllm_runtime.metrics import ServeMetrics
    from vllm_runtime.serve import ServePlan, Supervisor

log = logging.getLogger(__name__)
ADAPTERS_FILE_ENV = "VLLM_RUNTIME_ADAPTERS_FILE"


def register_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA adapters")
    group.add_argument(
        "--adapters-file", type=Path, default=None,
        help="JSON/YAML file with the desired adapters ({\"adapters\": [{name, model, commit}]}, the operator's "
        "ConfigMap); with it vLLM starts with --enable-lora and adapters are loaded/unloaded while serving",
    )  # fmt: skip
    group.add_argument("--max-loras", type=int, default=None,
                       help="adapters in one batch (default: the number of adapters in the file)")
    group.add_argument("--max-lora-rank", type=int, default=None,
                       help="largest adapter rank (default: the smallest vLLM accepts that holds the adapters' ranks)")
    group.add_argument("--max-cpu-loras", type=int, default=None,
                       help="adapters kept in host memory (default: max(--max-loras, number of adapters))")
    group.add_argument("--adapter-poll-interval", type=float, default=2.0,
                       help="seconds between checks of the adapters file (default: 2)")


def lora_for_serve(args: argparse.Namespace, cache_dir: Path | None) -> LoraSettings | None:
    """vLLM's LoRA settings for this serve, or None without ``--adapters-file``. ValueError: bad limits."""
    if args.adapters_file is None:
        if any(getattr(args, a) is not None for a in ("max_loras", "max_lora_rank", "max_cpu_loras")):
            raise ValueError("--max-loras/--max-lora-rank/--max-cpu-loras need --adapters-file")
        return None
    try:
        _, desired = read_adapters_file(args.adapters_file)
    except AdaptersFileError as exc:  # the converger reports it and picks the file up once it is usable
        log.warning("%s; starting with no adapters", exc)
        desired = []
    ranks = known_ranks(cache_dir, desired)
    settings = lora_settings(
        desired, ranks, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras
    )
    log.info("LoRA: %s (adapter ranks %s)", " ".join(settings.flags()), dict(ranks) or "unknown")
    return settings


def _base_facts(model_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The base model's config.json and safetensors headers (no weights), for the adapter checks."""
    if model_dir is None:
        return {}, None
    from vllm_runtime.planner.sources import load_model

    try:
        facts = load_model(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - the checks then rely on vLLM's own
        log.warning("cannot read the base model's shapes from %s (%s): adapters are checked by vLLM only",
                    model_dir, exc)
        return {}, None
    return facts.config, dict(facts.tensors)


def start_converger(
    args: argparse.Namespace,
    plan: ServePlan,
    lora: LoraSettings | None,
    cache_dir: Path | None,
    supervisor: Supervisor,
    metrics: ServeMetrics,
) -> AdapterConverger | None:
    if lora is None or args.adapters_file is None:
        return None
    config, tensors = _base_facts(plan.model_dir)
    converger = AdapterConverger(
        adapters_file=args.adapters_file,
        api=VllmAdapterAPI(supervisor.base_url),
        cache_dir=cache_dir,
        base_config=config,
        base_tensors=tensors,
        max_lora_rank=lora.max_lora_rank,
        served_names=tuple(plan.served_model_names),
        is_ready=lambda: supervisor.ready,
        metrics=metrics,
        poll_interval=args.adapter_poll_interval,
        limits=lora.to_status(),
    )
    supervisor.status_sections["adapters"] = converger.status
    converger.start()
    return converger
