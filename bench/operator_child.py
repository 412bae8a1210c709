"""The operator under benchmark, in its own process: kopf + this project's handlers against a URL.

    python bench/operator_child.py --server http://127.0.0.1:PORT --metrics-port N

It is the production ``runner.operator_task`` with a login that points at the emulated API server
(plain HTTP, no credentials); the parent measures this process' resident memory from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
    parser.add_argument("--reconcile-interval", type=float, default=Config.reconcile_interval_seconds,
                        help="the periodic resync (VLLM_OPERATOR_RECONCILE_INTERVAL_SECONDS); default as shipped")
    parser.add_argument("--tracemalloc", metavar="FILE",
                        help="diagnostics: trace allocations; SIGUSR1 writes the top ones by file to FILE")
    args = parser.parse_args()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)

        def dump(*_: object) -> None:
            stats = tracemalloc.take_snapshot().statistics("filename")
            with open(args.tracemalloc, "w") as out:
                for stat in stats[:30]:
                    out.write(f"{stat.size / 2**20:8.1f} MiB {stat.count:8d} blocks  {stat.traceback}\n")

        signal.signal(signal.SIGUSR1, dump)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def login() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=args.server)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Cluster-wide: with a namespace list kopf first lists /api/v1/namespaces, a path kmock cannot parse.
        # Other VLLM_OPERATOR_* variables (e.g. CHILD_EVENT_DELAY_SECONDS, WORKER_LIMIT) come from the environment.
        config = dataclasses.replace(
            Config.from_env(), metrics_port=args.metrics_port, reconcile_interval_seconds=args.reconcile_interval
        )
        await runner.operator_task(config, (), login=login, stop_flag=stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
