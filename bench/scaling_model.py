"""A scaling sketch: time for N replicas to become ready, one shared cache vs each replica downloading.

Nothing here is measured at scale; it is arithmetic over rates, stated as assumptions:

- measured on this machine by the benchmarks (``bench/run.py`` passes them in): the cache step's
  sha256 verification rate (cores x single-core sha256) and the runtime's start-up overhead;
- published (``shared/reference/performance.md``): Hub download per client (hf_xet ~2.2 GB/s, equal to a
  25 Gbps NIC), node NIC 25 Gbps = 3.1 GB/s, shared volumes (EFS ~0.5 GB/s fill, gp3 up to 2,000 MiB/s,
  Filestore zonal 260 MiB/s per TiB), weight load with vLLM's default safetensors loader ~1.07 GB/s
  (disk-bound, cold page cache), torch.compile warm vs cold (llama 3.9 s vs 27.1 s).

Model, per scenario (S = model bytes, N = replicas, each on its own node):

- ``each``: every replica pulls S itself. Per-replica rate = min(Hub per client, NIC, egress / N),
  where ``egress`` is what the cluster's way out (NAT gateway, proxy, Hub rate limit) gives all
  replicas together. Then it verifies S locally and loads S from its own local disk. Every replica
  compiles (no shared compile cache). ready = download + verify + load + compile + start overhead.
- ``shared``: one cache Job pulls S once into a ReadWriteMany volume (rate = min(Hub per client, NIC,
  volume write)) and verifies it once; then N replicas load S at once from the volume, each at
  min(loader rate, volume read / N, NIC); the compile cache is on the volume, so only the first
  compiles cold. ready = download + verify + load + warm compile + start overhead (replica 1 compiles
  cold, taken as the worst replica's time only when N = 1).

What it leaves out: pod scheduling and image pulls (p99 <= 5 s by the Kubernetes SLO, equal for both),
Hub throttling beyond ``egress``, page-cache sharing between replicas on one node, and the volume's
own provisioning time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class Assumptions:
    hub_per_client: float = 2.2 * GB  # hf_xet, one client (unslothai/unsloth-zoo#972)
    nic: float = 3.1 * GB  # 25 Gbps node
    egress: float = 12.5 * GB  # all replicas together: a 100 Gbps way out of the cluster
    volume_write: float = 2000 * 2**20  # gp3 maximum; EFS fills at ~0.5 GB/s
    volume_read_aggregate: float = 2000 * 2**20  # what N readers share on the RWX volume
    loader: float = 1.07 * GB  # vLLM default safetensors loader, cold page cache (Qwen3-30B on H200)
    local_disk_write: float = 1.4 * GB  # the lent GPU machine's disk, lower bound
    verify: float = 1.9 * GB * 2  # sha256 per core x cores; replaced by the measured figure
    compile_cold: float = 27.1  # llama, torch 2.12 (vllm#37198)
    compile_warm: float = 3.9
    start_overhead: float = 0.5  # vllm-runtime serve over plain vLLM; replaced by the measured figure

    def describe(self) -> dict[str, str]:
        def rate(x: float) -> str:
            return f"{x / GB:.2f} GB/s"

        return {
            "Hub per client": rate(self.hub_per_client), "node NIC": rate(self.nic),
            "cluster egress (all replicas)": rate(self.egress), "RWX volume write": rate(self.volume_write),
            "RWX volume read (all readers)": rate(self.volume_read_aggregate), "vLLM loader": rate(self.loader),
            "local disk write": rate(self.local_disk_write), "sha256 verification": rate(self.verify),
            "compile cold / warm": f"{self.compile_cold:.1f} s / {self.compile_warm:.1f} s",
            "runtime start overhead": f"{self.start_overhead:.2f} s",
        }  # fmt: skip


def each_downloads(size: float, replicas: int, a: Assumptions) -> dict[str, float]:
    rate = min(a.hub_per_client, a.nic, a.egress / replicas, a.local_disk_write)
    parts = {
        "download": size / rate,
        "verify": size / a.verify,
        "load": size / a.loader,
        "compile": a.compile_cold,
        "overhead": a.start_overhead,
    }
    parts["ready"] = sum(parts.values())
    return parts


def shared_cache(size: float, replicas: int, a: Assumptions) -> dict[str, float]:
    download_rate = min(a.hub_per_client, a.nic, a.volume_write)
    load_rate = min(a.loader, a.volume_read_aggregate / replicas, a.nic)
    parts = {
        "download": size / download_rate,
        "verify": size / a.verify,
        "load": size / load_rate,
        "compile": a.compile_cold if replicas == 1 else a.compile_warm,
        "overhead": a.start_overhead,
    }
    parts["ready"] = sum(parts.values())
    return parts


def table(sizes: dict[str, float], replicas: list[int], a: Assumptions) -> list[dict[str, Any]]:
    rows = []
    for label, size in sizes.items():
        for n in replicas:
            each, shared = each_downloads(size, n, a), shared_cache(size, n, a)
            rows.append({"model": label, "replicas": n, "each_s": each["ready"], "shared_s": shared["ready"],
                         "each": each, "shared": shared, "hub_bytes_each": size * n, "hub_bytes_shared": size})  # fmt: skip
    return rows


DEFAULT_SIZES = {"8B bf16 (16 GB)": 16 * GB, "70B bf16 (141 GB)": 141 * GB}
DEFAULT_REPLICAS = [1, 4, 16, 64]


def markdown(rows: list[dict[str, Any]], a: Assumptions) -> str:
    lines = [
        "| Model | Replicas | Each downloads: ready (s) | Shared cache: ready (s) | Shared / each | Hub bytes each / shared |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['replicas']} | {r['each_s']:.0f} (dl {r['each']['download']:.0f}, load "
            f"{r['each']['load']:.0f}) | {r['shared_s']:.0f} (dl {r['shared']['download']:.0f}, load "
            f"{r['shared']['load']:.0f}) | {r['shared_s'] / r['each_s']:.2f} | "
            f"{r['hub_bytes_each'] / GB:.0f} / {r['hub_bytes_shared'] / GB:.0f} GB |"
        )
    lines.append("")
    lines.append("Assumptions: " + "; ".join(f"{k} {v}" for k, v in a.describe().items()) + ".")
    return "\n".join(lines)


def assumptions_from_measured(verify_rate: float | None, start_overhead: float | None) -> Assumptions:
    a = Assumptions()
    if verify_rate:
        a = replace(a, verify=verify_rate)
    if start_overhead is not None:
        a = replace(a, start_overhead=max(0.0, start_overhead))
    return a


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--verify-rate", type=float, help="measured sha256 verification bytes/s")
    parser.add_argument("--start-overhead", type=float, help="measured serve overhead in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    a = assumptions_from_measured(args.verify_rate, args.start_overhead)
    rows = table(DEFAULT_SIZES, DEFAULT_REPLICAS, a)
    print(json.dumps({"assumptions": asdict(a), "rows": rows}, indent=1) if args.json else markdown(rows, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
