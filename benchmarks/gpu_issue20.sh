#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md's "GPU fast path, second round" (one H200): the GPU tests of the round,
# decode profiles (V2-Lite bf16 at batch 1/64/256, V3 cut to 6 layers FP8 at 1/32), a cold batch's first
# tokens, and `moeserve serve` from start to /health with its first requests. Results land in $OUT (default out/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
summary='import json,sys
for l in sys.stdin:
    d = json.loads(l)
    print(sys.argv[1], d["batch"], "step %.2f ms, GPU busy %.2f, floor %.2f; async %s; check: %s; build %.0f s" % (
        d["step_ms"], d["gpu_busy_ms_per_step"], d["hbm_floor"]["floor_ms"], d.get("async_scheduling"),
        d["fast_path_error"] or "all on", d["build_s"]))'
timeout 170 python3 -m pytest -q -x -p no:cacheprovider tests/kernel_cases_moe.py tests/kernel_cases_check.py \
    tests/test_engine.py::test_closed_engine_gives_device_memory_back \
    tests/test_async_scheduling.py::test_streams_equal_synchronous_on_cuda 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
timeout 200 python3 benchmarks/profile_decode.py --batches 1,64,256 --json-out "$OUT/prof_v2lite.json" 2>&1 |
    grep '"batch"' | python3 -c "$summary" v2lite
timeout 150 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 \
    --batches 1,32 --json-out "$OUT/prof_v3.json" 2>&1 | grep '"batch"' | python3 -c "$summary" v3-6l
timeout 100 python3 benchmarks/ttft_cold.py --model benchmarks/configs/deepseek_v3_6l 2>&1 | tail -1 | tee "$OUT/ttft_v3.json"
python3 -m moeserve.launch.cli serve --model benchmarks/configs/deepseek_v2_lite --load-format dummy \
    --skip-tokenizer-init --device cuda --port 8011 > "$OUT/serve.log" 2>&1 &
timeout 60 python3 - <<'PY'
import json, time, urllib.request
start = time.time()
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:8011/health", timeout=1)
        break
    except Exception:
        time.sleep(0.1)
print("serve: start to /health 200 in %.1f s" % (time.time() - start))
model = json.load(urllib.request.urlopen("http://127.0.0.1:8011/v1/models", timeout=5))["data"][0]["id"]
for i in range(3):  # 1024-token prompts of token ids, 16 greedy tokens each, one after another
    body = json.dumps({"model": model, "prompt": list(range(100 + i, 1124 + i)), "max_tokens": 16,
                       "temperature": 0}).encode()
    t = time.time()
    req = urllib.request.Request("http://127.0.0.1:8011/v1/completions", body, {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30).read()
        print("request %d: %.3f s" % (i, time.time() - t))
    except Exception as e:  # noqa: BLE001
        print("request %d failed: %s" % (i, e))
PY
grep -iE "fused kernels off|graphs off|captured|warm-up" "$OUT/serve.log" | cut -c1-200
kill %1 2>/dev/null
