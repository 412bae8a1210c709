"""GPU memory sizes the planner knows by name, and parsing of explicit memory sizes.

vLLM multiplies the memory CUDA reports (``cudaMemGetInfo`` total: NVML's total minus what the driver
reserves, i.e. NVML v2 ``total - reserved``) by ``gpu_memory_utilization``. Marketing sizes ("80 GB")
and ``nvidia-smi``'s total are larger. The table holds the CUDA-visible size: measured on the lent
H100 and H200; for the others, the NVML total less an estimated 0.6% driver reservation (the H100
reserves 480 MiB of 81,559 MiB, the H200 615 MiB of 143,771 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_runtime.units import parse_size

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_bytes: int  # what CUDA (and so vLLM) sees as the total
    nvml_total_bytes: int  # nvidia-smi's memory.total
    measured: bool
    description: str


def _estimated(name: str, nvml_mib: int, description: str) -> GpuType:
    return GpuType(name, int(nvml_mib * MiB * 0.994) // MiB * MiB, nvml_mib * MiB, False, description)


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        _estimated("L4", 23034, "NVIDIA L4 24 GB"),
        _estimated("A10G", 23028, "NVIDIA A10G 24 GB"),
        _estimated("L40S", 46068, "NVIDIA L40S 48 GB"),
        _estimated("A100-40GB", 40960, "NVIDIA A100 40 GB"),
        _estimated("A100-80GB", 81920, "NVIDIA A100 80 GB"),
        GpuType("H100", 85017493504, 81559 * MiB, True, "NVIDIA H100 80 GB HBM3"),
        GpuType("H200", 150109880320, 143771 * MiB, True, "NVIDIA H200 141 GB"),
        _estimated("B200", 183359, "NVIDIA B200 180 GB"),
    )
}


def gpu_type(name: str) -> GpuType:
    """Look a GPU up by name (case-insensitive; 'A100' alone is ambiguous and refused)."""
    for known, gpu in GPU_TYPES.items():
        if known.lower() == name.strip().lower():
            return gpu
    raise ValueError(f"unknown GPU type {name!r}: use one of {', '.join(GPU_TYPES)} or give the memory size instead")


def parse_memory(text: str | int) -> int:
    """Parse a memory size: '80GiB', '80Gi' (Kubernetes), '80GB', '81559MiB', or bytes."""
    return parse_size(text)
