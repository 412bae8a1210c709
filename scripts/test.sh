#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, end-to-end tests with real vLLM included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
