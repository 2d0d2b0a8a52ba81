#!/usr/bin/env bash
# One H200, after the session's merges: the GPU-only tests, a V2-Lite decode profile (is the fast path still
# on and as fast), and MTP's verify-step cost on V3 cut to 6 layers at batch 1 and 32 (dummy weights: nothing
# is accepted, so the figure is the cost of a step that verifies one draft per sequence). Results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/test_engine.py::test_closed_engine_gives_device_memory_back \
    tests/test_async_scheduling.py::test_streams_equal_synchronous_on_cuda \
    tests/test_dummy_fp8.py::test_fp8_experts_on_gpu_equal_dequantized_ones 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
timeout 120 python3 benchmarks/profile_decode.py --batches 1,64 --json-out "$OUT/prof_v2lite.json" 2>&1 |
    grep '"batch"' | python3 -c 'import json,sys
for l in sys.stdin:
    d = json.loads(l)
    print("v2lite", d["batch"], "step %.2f ms, busy %.2f, check: %s, graphs %s" % (d["step_ms"],
          d["gpu_busy_ms_per_step"], d["fast_path_error"] or "all on", d["graphs"]))'
for n in 1 32; do
    timeout 150 python3 -m moeserve.launch.cli bench --model benchmarks/configs/deepseek_v3_6l --load-format dummy \
        --skip-tokenizer-init --device cuda --num-prompts $n --input-len 128 --output-len 128 --rounds 2 \
        --speculative-config '{"method": "mtp", "num_speculative_tokens": 1, "adaptive": false}' \
        --json-out "$OUT/mtp_v3_b$n.json" 2>&1 | tail -4
done
