#!/usr/bin/env bash
# One H200 after a merge: every GPU-only test (the kernel cases in bf16 and FP8 with graphs, the engine's
# GPU tests, the KV mover's copies on CUDA, disaggregation on one GPU, MTP with graphs), then decode profiles
# (V2-Lite bf16 at batch 1/64, V3 cut to 6 layers FP8 at 1/32) and MTP's step cost on the V3 cut at batch 1 and
# 32. Results in $OUT.
# Knobs: TESTS_S (the tests' time limit), V2_BATCHES / V3_BATCHES (the profiles' batch sizes), MTP_BATCHES
# ("" skips MTP), MOE_BENCH (arguments for benchmarks/bench_moe_kernels.py, run after the tests; unset: skipped),
# OPS_BATCHES (V2-Lite batch sizes for profile_ops.py: which lines launch a step's kernels; unset: skipped),
# MLA_SMALL=1 (bench_mla_decode.py's sweep at batches of 1 and 4, up to 64 splits; unset: skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
summary='import json,sys
for l in sys.stdin:
    d = json.loads(l)
    print(sys.argv[1], d["batch"], "step %.2f ms, GPU busy %.2f; check: %s; graphs %s" % (
        d["step_ms"], d["gpu_busy_ms_per_step"], d["fast_path_error"] or "all on", d["graphs"]))'
timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider tests/kernel_cases*.py \
    tests/test_async_scheduling.py tests/test_backends.py tests/test_disagg_gpu.py tests/test_dummy_fp8.py \
    tests/test_engine.py tests/test_fast_path_shapes.py tests/test_kernels.py tests/test_kvstore_units.py tests/test_store_load_staged.py tests/test_sampling.py tests/test_spec_decode.py \
    -k "cuda or gpu or GPU or kernel or fp8 or closed or shared or kv_rows or staged or fast_path" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
if [ -n "${MOE_BENCH:-}" ]; then
    # shellcheck disable=SC2086
    timeout ${MOE_BENCH_S:-200} python3 benchmarks/bench_moe_kernels.py $MOE_BENCH --json-out "$OUT/moe_kernels.json" 2>&1 |
        grep -E '"tokens"' | cut -c1-600
fi
if [ -n "${OPS_BATCHES:-}" ]; then
    timeout 150 python3 benchmarks/profile_ops.py --batches "$OPS_BATCHES" --json-out "$OUT/ops_v2lite.json" 2>&1 |
        grep -v Warning | head -90
fi
if [ -n "${MLA_SMALL:-}" ]; then
    timeout 200 python3 benchmarks/bench_mla_decode.py --shapes v2lite-small,v3-small --json-out "$OUT/mla_small.json" \
        2>&1 | grep -v "^#" | cut -c1-700
fi
timeout 150 python3 benchmarks/profile_decode.py --batches ${V2_BATCHES:-1,64} --json-out "$OUT/prof_v2lite.json" 2>&1 |
    grep '"batch"' | python3 -c "$summary" v2lite
timeout 150 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 \
    --batches ${V3_BATCHES:-1,32} --json-out "$OUT/prof_v3.json" 2>&1 | grep '"batch"' | python3 -c "$summary" v3-6l
for n in ${MTP_BATCHES:-1 32}; do
    timeout 150 python3 -m moeserve.launch.cli bench --model benchmarks/configs/deepseek_v3_6l --load-format dummy \
        --skip-tokenizer-init --device cuda --num-prompts $n --input-len 128 --output-len 128 --rounds 2 \
        --speculative-config '{"method": "mtp", "num_speculative_tokens": 1, "adaptive": false}' \
        --json-out "$OUT/mtp_v3_b$n.json" 2>&1 | grep -E "step_ms|draft_ms|speedup"
done
