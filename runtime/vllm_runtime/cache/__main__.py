"""``python -m vllm_runtime.cache ARGS`` is ``vllm-runtime cache ARGS`` (for images without the console script)."""

import sys

from vllm_runtime.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
