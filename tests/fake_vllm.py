"""A stand-in for vLLM's OpenAI server in unit tests of ``vllm-runtime serve``: same flags, same log
lines (vLLM 0.32's wording), /health, /v1/models and /metrics; SIGTERM stops it.

FAKE_VLLM_MODE: ``ok`` (default) serves until SIGTERM and exits FAKE_VLLM_TERM_EXIT (default 0);
``fail`` prints the failure log FAKE_VLLM_FAILURE_LOG and exits 1. FAKE_VLLM_ENV_DUMP: a file to which
the environment it got is written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="*")
    args, _unknown = parser.parse_known_args()
    if dump := os.environ.get("FAKE_VLLM_ENV_DUMP"):
        Path(dump).write_text(json.dumps({"env": dict(os.environ), "argv": sys.argv[1:], "nice": os.nice(0), "pid": os.getpid()}))
    say = lambda line: print(line, flush=True)  # noqa: E731
    say("(APIServer pid=1) INFO 11-27 21:00:00 [api_utils.py:286] non-default args: {...}")
    if os.environ.get("FAKE_VLLM_MODE") == "fail":
        sys.stdout.write(Path(os.environ["FAKE_VLLM_FAILURE_LOG"]).read_text())
        return 1
    say("(Worker pid=2) INFO 11-27 21:00:01 [default_loader.py:501] Loading weights took 0.25 seconds")
    say("(Worker pid=2) INFO 11-27 21:00:01 [cpu_model_runner.py:87] Warming up model for the compilation...")
    say("(Worker pid=2) INFO 11-27 21:00:02 [monitor.py:40] torch.compile took 1.50 s in total")
    say(
        "(EngineCore pid=3) INFO 11-27 21:00:02 [kv_cache_utils.py:2327] CPU KV cache size: 8,192 tokens, "
        "Maximum concurrency for 256 tokens per request: 32.00x"
    )
    say("(EngineCore pid=3) INFO 11-27 21:00:02 [core.py:402] init engine (profile, create kv cache, warmup model) took 2.00 s")
    names = args.served_model_name or [args.model]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                body = b""
            elif self.path == "/v1/models":
                body = json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in names]}).encode()
            elif self.path == "/metrics":
                body = (
                    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                    "# TYPE vllm:num_requests_running gauge\n"
                    f'vllm:num_requests_running{{engine="0",model_name="{names[0]}"}} 0.0\n'
                ).encode()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    delay = float(os.environ.get("FAKE_VLLM_READY_DELAY", "0.3"))
    time.sleep(delay)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say(f"(APIServer pid=1) INFO 11-27 21:00:03 [entry.py:140] Starting vLLM server on http://{args.host}:{args.port}")
    stop.wait()
    say("(APIServer pid=1) INFO 11-27 21:00:09 [launcher.py:270] [shutdown] API server: shutdown triggered")
    server.shutdown()
    return int(os.environ.get("FAKE_VLLM_TERM_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(main())
