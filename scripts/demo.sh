#!/usr/bin/env bash
# The README's main job, on a machine with no cluster, no GPU and no Hub access: the whole path a model
# pod runs (vllm-runtime cache from a loopback Hub -> vllm-runtime serve on vLLM's CPU build -> a
# completion -> the metrics -> SIGTERM), then what the operator would create for examples/.
#   bash scripts/demo.sh                      # tiny generated model
#   bash scripts/demo.sh --model Qwen/Qwen2.5-0.5B-Instruct   # a small real model, where the Hub is reachable
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vllm-runtime demo "$@"
out=${TMPDIR:-/tmp}/vllm-runtime-demo/rendered.yaml
mkdir -p "$(dirname "$out")"
vllm-operator render -f examples/ > "$out"
echo
echo "vllm-operator render -f examples/ -> $out (the objects the operator creates for each example):"
grep -E '^kind:|^  name:' "$out" | paste - - | awk '{printf "  %-22s %s\n", $2, $4}'
