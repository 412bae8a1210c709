"""``vllm-runtime``: the entrypoint of every model pod and cache Job.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; the
parser it adds sets ``func`` to a callable taking the parsed arguments and returning
the process exit code (see ``summary`` for the codes).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Modules that provide subcommands, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = (
    "vllm_runtime.cache",  # cache
    "vllm_runtime.serve",  # serve
    "vllm_runtime.sibling_server",  # sibling: serve this volume's verified files to peer replicas
    "vllm_runtime.planner.cli",  # plan
    "vllm_runtime.manage",  # ls, rm, gc
    "vllm_runtime.demo",  # demo: the whole pod path on this machine
)
# Development tools that images leave out (.dockerignore): the command line works without them.
OPTIONAL_MODULES = frozenset({"vllm_runtime.demo"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-runtime",
        description="Pre-cache, verify and serve pinned Hugging Face models with vLLM.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name in OPTIONAL_MODULES and exc.name == name:
                continue  # left out of this build (the runtime image carries no demo)
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
