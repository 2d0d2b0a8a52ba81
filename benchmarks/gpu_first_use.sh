#!/usr/bin/env bash
# First use on a new machine (one H200): with an empty Triton cache, the cold batches of V2-Lite and V3 cut to
# 6 layers repeated in one engine and the kernels compiled after start (none should be), then `moeserve serve`
# from start to /health with that cache warm and its first requests one after another.
# Results land in $OUT (default out/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
export TRITON_CACHE_DIR=$(mktemp -d /tmp/triton-cache-XXXX)
timeout 200 python3 benchmarks/ttft_cold.py --model benchmarks/configs/deepseek_v2_lite --prompts 64 2>&1 |
    grep '^{' | tee "$OUT/first_use_v2lite.json"
timeout 200 python3 benchmarks/ttft_cold.py --model benchmarks/configs/deepseek_v3_6l --prompts 32 2>&1 |
    grep '^{' | tee "$OUT/first_use_v3.json"
for run in 1 2; do
    python3 -m moeserve.launch.cli serve --model benchmarks/configs/deepseek_v2_lite --load-format dummy \
        --skip-tokenizer-init --device cuda --port 8011 -v > "$OUT/serve_$run.log" 2>&1 &
    timeout 60 python3 benchmarks/serve_first_requests.py --port 8011 | tee "$OUT/serve_$run.txt"
    kill %1 2>/dev/null; wait
done
