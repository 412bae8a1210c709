"""vLLM's LoRA settings for a server with adapters, with defaults computed from the adapters' ranks.

vLLM fixes them at start (its LoRA buffers are sized by them), so an adapter added later must fit them:
``max_lora_rank`` is the smallest rank vLLM accepts that holds every adapter the file names at start
(vLLM's own default, 16, when none is cached yet), ``max_loras`` (adapters in one batch) is the number of
adapters, ``max_cpu_loras`` (adapters kept in host memory) at least that. Values given explicitly win.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_runtime import vllm_args
from vllm_runtime.adapters import checks, errors
from vllm_runtime.adapters.converge import cached_adapter_dir
from vllm_runtime.adapters.desired import DesiredAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    ranks: tuple[tuple[str, int], ...] = ()  # (adapter, rank) the defaults were computed from

    def flags(self) -> list[str]:
        return vllm_args.lora_flags(
            max_loras=self.max_loras, max_lora_rank=self.max_lora_rank, max_cpu_loras=self.max_cpu_loras
        )

    def to_status(self) -> dict[str, int]:
        return {"maxLoras": self.max_loras, "maxLoraRank": self.max_lora_rank, "maxCpuLoras": self.max_cpu_loras}


def known_ranks(cache_dir: Path | None, desired: Sequence[DesiredAdapter]) -> list[tuple[str, int]]:
    """Ranks of the desired adapters already cached (read from adapter_config.json only)."""
    ranks: list[tuple[str, int]] = []
    for entry in desired:
        if entry.problem is not None:
            continue
        try:
            directory, _ = cached_adapter_dir(cache_dir, entry)
            rank = checks.rank_of(checks.read_adapter_config(directory, entry.name))
        except errors.AdapterError:
            continue
        if rank is not None and 0 < rank <= checks.VLLM_LORA_RANKS[-1]:
            ranks.append((entry.name, rank))
    return ranks


def lora_settings(
    desired: Sequence[DesiredAdapter],
    ranks: Sequence[tuple[str, int]],
    *,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    max_cpu_loras: int | None = None,
) -> LoraSettings:
    """The settings to start vLLM with. Raises ValueError naming the flag for values vLLM refuses."""
    if max_lora_rank is not None and max_lora_rank not in checks.VLLM_LORA_RANKS:
        raise ValueError(
            f"--max-lora-rank {max_lora_rank} is not one vLLM accepts ({', '.join(map(str, checks.VLLM_LORA_RANKS))})"
        )
    wanted = max((r for _, r in ranks), default=0)
    rank = max_lora_rank or (checks.smallest_vllm_rank(wanted) if wanted else checks.VLLM_DEFAULT_MAX_LORA_RANK)
    usable = sum(1 for d in desired if d.problem is None)
    loras = max_loras or max(1, usable)
    cpu = max_cpu_loras or max(loras, usable)
    if loras < 1:
        raise ValueError(f"--max-loras must be at least 1, got {loras}")
    if cpu < loras:
        raise ValueError(f"--max-cpu-loras ({cpu}) must be at least --max-loras ({loras}), as vLLM requires")
    return LoraSettings(max_loras=loras, max_lora_rank=rank, max_cpu_loras=cpu, ranks=tuple(ranks))
