"""One download or warm check in a fresh process (as a pod would run it); prints one JSON line.

    python bench/cache_child.py cache|warm ENDPOINT REPO_ID CACHE_DIR

- ``cache``: ``vllm_runtime.cache.run_cache`` (pin, download, sha256-verify, manifest), 8 workers.
- ``warm``: ``run_cache`` on a cache that already holds the model, counting what it reads: every
  ``open``/``os.open`` of a path is recorded (a patched open counter), and ``rchar``/``read_bytes`` of
  /proc/self/io are read before and after (``rchar`` counts bytes returned by read calls, page cache
  hits and sockets included; ``read_bytes`` counts bytes fetched from the block device).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def proc_io() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        fields[key.strip()] = int(value)
    return fields


class OpenCounter:
    """Records every path opened through builtins.open, io.open and os.open while installed."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._saved: tuple[Any, Any, Any] | None = None

    def __enter__(self) -> OpenCounter:
        real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

        def counted_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.fsdecode(file))
            return real_open(file, *args, **kwargs)

        def counted_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            self.paths.append(os.fsdecode(path))
            return real_os_open(path, *args, **kwargs)

        self._saved = (real_open, real_io_open, real_os_open)
        builtins.open = counted_open
        io.open = counted_open
        os.open = counted_os_open
        # pathlib opens through io.open in 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        builtins.open, io.open, os.open = self._saved

    def weight_opens(self) -> list[str]:
        return [p for p in self.paths if p.endswith(WEIGHT_SUFFIXES)]


def main() -> int:
    mode, endpoint, repo_id, cache_dir = sys.argv[1:]
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    result: dict[str, Any] = {"mode": mode}
    if mode in ("cache", "warm"):
        from vllm_runtime.cache import CacheOptions, run_cache

        opts = CacheOptions(model=repo_id, cache_dir=Path(cache_dir), endpoint=endpoint, max_workers=8)
        io_before = proc_io()
        with OpenCounter() as counter:
            began = time.perf_counter()
            summary = run_cache(opts)
            result["seconds"] = time.perf_counter() - began
        io_after = proc_io()
        data = json.loads(summary.to_json())
        if not data.get("ok"):
            raise SystemExit(f"cache failed: {summary.to_json()}")
        result.update({"commit": data.get("commit"), "bytes": data.get("bytes"), "files": data.get("files"),
                       "reused": data.get("reused")})  # fmt: skip
        if mode == "warm":
            result.update({
                "opens": len(counter.paths),
                "weight_file_opens": len(counter.weight_opens()),
                "opened": sorted({p for p in counter.paths if not p.endswith((".py", ".pyc"))})[:20],
                "rchar": io_after["rchar"] - io_before["rchar"],
                "read_bytes": io_after["read_bytes"] - io_before["read_bytes"],
            })  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
