"""Check the runtime's GPU memory metrics against CUDA on a real GPU.

Holds tensors of known sizes and compares what ``vllm-runtime serve`` exports (NVML through
nvidia-ml-py, read back from the Prometheus exposition exactly as a scrape sees it) with
``torch.cuda.mem_get_info``. Pass: used, free and total within 1%, and the growth of "used"
equals the tensor's size within 1%.

    PYTHONPATH=runtime python bench/gpu/check_gpu_metrics.py [--out RESULTS.json] [--sizes-gib 1,8,32]

Needs torch with CUDA and nvidia-ml-py; vLLM is not needed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import torch

from vllm_runtime.metrics import Nvml, ServeMetrics, first_value, parse_exposition

GIB = 1 << 30
TOLERANCE = 0.01


def scrape(metrics: ServeMetrics, gpu: str) -> dict[str, float]:
    samples = parse_exposition(metrics.exposition().decode())
    out = {}
    for field in ("used", "free", "total", "reserved"):
        value = first_value(samples, f"vllm_runtime_gpu_memory_{field}_bytes", gpu=gpu)
        assert value is not None, f"no {field} series for gpu {gpu}"
        out[field] = value
    out["available"] = first_value(samples, "vllm_runtime_gpu_metrics_available") or 0.0
    return out


def cuda_numbers() -> dict[str, float]:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"free": float(free), "total": float(total), "used": float(total - free)}


def rel(a: float, b: float) -> float:
    return abs(a - b) / b if b else float("inf")


def nvml_index_of_cuda0() -> int:
    """NVML orders by PCI bus, CUDA fastest first: match by UUID where torch exposes it."""
    import pynvml

    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "")
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        nv_uuid = pynvml.nvmlDeviceGetUUID(handle)
        nv_uuid = nv_uuid.decode() if isinstance(nv_uuid, bytes) else nv_uuid
        if uuid and nv_uuid.replace("GPU-", "") == uuid.replace("GPU-", ""):
            return index
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--sizes-gib", default="1,8,32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import pynvml

    nvml = Nvml()
    metrics = ServeMetrics(nvml=nvml)
    assert nvml.available(), nvml.error
    gpu = str(nvml_index_of_cuda0())
    handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
    driver = pynvml.nvmlSystemGetDriverVersion()
    v1 = pynvml.nvmlDeviceGetMemoryInfo(handle)
    report: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0),
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nvml_gpu_index": gpu,
        "nvml_v1_at_start": {"total": v1.total, "free": v1.free, "used": v1.used},
        "tolerance": TOLERANCE,
        "rows": [],
    }
    torch.zeros(1, device="cuda")  # create the CUDA context before the baseline
    base_cuda, base_metrics = cuda_numbers(), scrape(metrics, gpu)
    report["baseline"] = {"cuda": base_cuda, "metrics": base_metrics}
    ok = True
    for size_gib in [float(s) for s in args.sizes_gib.split(",") if s]:
        size = int(size_gib * GIB)
        held = torch.empty(size, dtype=torch.uint8, device="cuda")
        held.fill_(1)  # touch every page
        cuda, got = cuda_numbers(), scrape(metrics, gpu)
        row = {
            "tensor_bytes": size,
            "cuda": cuda,
            "metrics": got,
            "rel_error": {k: rel(got[k], cuda[k]) for k in ("used", "free", "total")},
            "used_growth": got["used"] - base_metrics["used"],
            "used_growth_rel_error": rel(got["used"] - base_metrics["used"], size),
        }
        row["pass"] = all(e <= TOLERANCE for e in row["rel_error"].values()) and row["used_growth_rel_error"] <= TOLERANCE
        ok = ok and bool(row["pass"])
        report["rows"].append(row)
        del held
        torch.cuda.empty_cache()
    report["pass"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
