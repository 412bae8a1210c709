"""The operator under benchmark, in its own process: kopf + this project's handlers against a URL.

    python bench/operator_child.py --server http://127.0.0.1:PORT --metrics-port N

It is the production ``runner.operator_task`` with a login that points at the emulated API server
(plain HTTP, no credentials); the parent measures this process' resident memory from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import kopf
from vllm_operator import runner
from vllm_operator.config import Config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def login() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=args.server)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Cluster-wide: with a namespace list kopf first lists /api/v1/namespaces, a path kmock cannot parse.
        config = Config(metrics_port=args.metrics_port)
        await runner.operator_task(config, (), login=login, stop_flag=stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
