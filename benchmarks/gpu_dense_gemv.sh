#!/usr/bin/env bash
# The dense small-row linear on one H200: every kernel case, V2-Lite decode at batch 1 and 4 with the library
# GEMM, then with the kernel (the default) at 1, 4, 64 and 256, V3 cut to 6 layers at 1 and 32, and serve's
# start to /health with its first requests. Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
summary='import json,sys
for l in sys.stdin:
    d = json.loads(l)
    print(sys.argv[1], d["batch"], "step %.3f ms, GPU busy %.3f, floor %.2f, kernels %.0f; check: %s" % (
        d["step_ms"], d["gpu_busy_ms_per_step"], d["hbm_floor"]["floor_ms"], d["kernels_per_step"],
        d["fast_path_error"] or "all on"))'
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -2
timeout 150 python3 benchmarks/profile_decode.py --batches 1,4 --no-dense-gemv \
    --json-out "$OUT/prof_v2lite_library.json" 2>&1 | grep '"batch"' | python3 -c "$summary" "v2lite library"
timeout 200 python3 benchmarks/profile_decode.py --batches 1,4,64,256 --json-out "$OUT/prof_v2lite.json" \
    2>&1 | grep '"batch"' | python3 -c "$summary" "v2lite"
timeout 150 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 \
    --batches 1,32 --json-out "$OUT/prof_v3.json" 2>&1 | grep '"batch"' | python3 -c "$summary" "v3-6l"
python3 -m moeserve.launch.cli serve --model benchmarks/configs/deepseek_v2_lite --load-format dummy \
    --skip-tokenizer-init --device cuda --port 8011 -v > "$OUT/serve.log" 2>&1 &
timeout 60 python3 benchmarks/serve_first_requests.py --port 8011 | tee "$OUT/serve.txt"
kill %1 2>/dev/null; wait
