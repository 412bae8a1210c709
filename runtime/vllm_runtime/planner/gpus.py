"""GPU memory sizes the planner knows by name, and parsing of explicit memory sizes.

Sizes are the total device memory as the driver reports it (``nvidia-smi --query-gpu=memory.total``,
NVML's ``nvmlDeviceGetMemoryInfo().total``), which is what vLLM multiplies by
``gpu_memory_utilization``. Marketing sizes ("80 GB") are a little larger or smaller than that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_bytes: int
    description: str


# name -> total memory as reported by the driver (MiB figures from nvidia-smi on each card).
GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("L4", 23034 * MiB, "NVIDIA L4 24 GB"),
        GpuType("A10G", 23028 * MiB, "NVIDIA A10G 24 GB"),
        GpuType("L40S", 46068 * MiB, "NVIDIA L40S 48 GB"),
        GpuType("A100-40GB", 40960 * MiB, "NVIDIA A100 40 GB"),
        GpuType("A100-80GB", 81920 * MiB, "NVIDIA A100 80 GB"),
        GpuType("H100", 81559 * MiB, "NVIDIA H100 80 GB HBM3"),
        GpuType("H200", 143771 * MiB, "NVIDIA H200 141 GB"),
        GpuType("B200", 183359 * MiB, "NVIDIA B200 180 GB"),
    )
}


def gpu_type(name: str) -> GpuType:
    """Look a GPU up by name (case-insensitive; 'A100' alone is ambiguous and refused)."""
    for known, gpu in GPU_TYPES.items():
        if known.lower() == name.strip().lower():
            return gpu
    raise ValueError(f"unknown GPU type {name!r}: use one of {', '.join(GPU_TYPES)} or give the memory size instead")


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_memory(text: str | int) -> int:
    """Parse a memory size: '80GiB', '80Gi' (Kubernetes), '80GB', '81559MiB', or bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 80GiB, 80Gi, 24GB or a number of bytes)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 ** " kmgt".index(unit or " ") if binary else _UNITS[unit]
    return int(number * base)


def smallest_gpu_with(memory_bytes: int) -> GpuType | None:
    """The smallest known GPU with at least ``memory_bytes`` of total memory."""
    for gpu in sorted(GPU_TYPES.values(), key=lambda g: g.memory_bytes):
        if gpu.memory_bytes >= memory_bytes:
            return gpu
    return None
