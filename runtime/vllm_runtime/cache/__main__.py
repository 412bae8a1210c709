"""``python -m vllm_runtime.cache ...``: the cache subcommand alone (same flags as ``vllm-runtime cache``)."""

import argparse
import logging
import sys

from vllm_runtime.cache.command import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-runtime")
    parser.add_argument("--log-level", default="INFO")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
