#!/usr/bin/env bash
# Copy the CRD's one source (crds/) into the Helm chart. tests/test_chart.py fails when the copies differ.
# Usage: scripts/sync-crd.sh          copy
#        scripts/sync-crd.sh --check  exit 1 (and show the diff) when the chart's copy is stale
set -euo pipefail
cd "$(dirname "$0")/.."
src=crds
dst=charts/vllm-operator/crds
if [ "${1:-}" = "--check" ]; then
  diff -r -u "$src" "$dst" && exit 0
  echo "The chart's CRDs differ from crds/: run scripts/sync-crd.sh" >&2
  exit 1
fi
mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$src"/*.yaml "$dst"/
echo "copied $(ls "$src"/*.yaml | wc -l) CRD file(s) into $dst"
