"""The loopback Hub in its own process, so the downloading client does not share its GIL.

    python bench/hub_child.py REPO_ID MODEL_DIR

Prints ``{"url": ..., "commit": ...}`` on one line, then answers commands on stdin, one per line:
``log`` prints the request log's totals since the last ``log`` (and clears it); end of input stops.
"""

from __future__ import annotations

import json
import sys

from vllm_runtime.devhub.server import DevHub


def main() -> int:
    repo_id, model_dir = sys.argv[1], sys.argv[2]
    hub = DevHub().start()
    commit = hub.add_repo(repo_id, model_dir)
    print(json.dumps({"url": hub.url, "commit": commit}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "log":
                records = [r for r in hub.log_snapshot() if not r.is_client_telemetry]
                hub.clear_log()
                print(json.dumps({
                    "requests": len(records),
                    "content_gets": sum(1 for r in records if r.is_file_content),
                    "bytes_sent": sum(r.bytes_sent for r in records),
                    "paths": sorted({f"{r.method} {r.path}" for r in records})[:20],
                }), flush=True)  # fmt: skip
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
