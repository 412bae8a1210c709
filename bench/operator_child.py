"""The operator under benchmark, in its own process: kopf + this project's handlers against a URL.

    VLLM_OPERATOR_METRICS_PORT=N python bench/operator_child.py --server http://127.0.0.1:PORT

It is the production ``runner.operator_task`` with a login that points at the emulated API server
(plain HTTP, no credentials); the parent measures this process' resident memory and CPU from outside.

Every operator knob (metrics port, resync interval, worker limit, ...) comes from the ``VLLM_OPERATOR_*``
environment variables through ``Config.from_env()``, never from flags here: the same child then runs the
code of another commit too (``operator_bench.py --baseline REF`` puts that commit's ``operator/`` and
``runtime/`` first on ``PYTHONPATH``), whatever knobs either version has. The first log line names the
``vllm_operator`` that was imported, so the parent can check which code ran.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal

import kopf
import vllm_operator
from operator_report import IMPORTED_FROM  # bench/, this script's folder, is first on sys.path
from vllm_operator import runner
from vllm_operator.config import Config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--tracemalloc", metavar="FILE",
                        help="diagnostics: trace allocations; SIGUSR1 writes the top ones by file to FILE")  # fmt: skip
    args = parser.parse_args()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)

        dumps = itertools.count(1)

        def dump(*_: object) -> None:
            snapshot = tracemalloc.take_snapshot()
            # each dump also keeps the whole snapshot: two of them compared (Snapshot.compare_to) show growth
            snapshot.dump(f"{args.tracemalloc}.{next(dumps)}.snapshot")
            stats = snapshot.statistics("filename")
            with open(args.tracemalloc, "w") as out:
                for stat in stats[:30]:
                    out.write(f"{stat.size / 2**20:8.1f} MiB {stat.count:8d} blocks  {stat.traceback}\n")

        signal.signal(signal.SIGUSR1, dump)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").warning("%s%s", IMPORTED_FROM, vllm_operator.__file__)

    async def login() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=args.server)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Cluster-wide (no namespace list): with one, kopf first lists /api/v1/namespaces.
        await runner.operator_task(Config.from_env(), (), login=login, stop_flag=stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
