set -uo pipefail
. .scratch/s16_common.sh
echo "== $(date +%T) tests"
timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/kernel_cases_moe.py \
    tests/test_async_scheduling.py tests/test_backends.py tests/test_disagg_gpu.py tests/test_dummy_fp8.py \
    tests/test_engine.py tests/test_kvstore_units.py tests/test_store_load_staged.py tests/test_sampling.py tests/test_spec_decode.py tests/test_side_streams.py \
    -k "cuda or gpu or GPU or kernel or fp8 or closed or shared or kv_rows or staged or side" > "$OUT/gpu_tests2.txt" 2>&1
grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests2.txt" | tail -15
prof v2b1-none 0 --batches 1
prof v2b1-side 1 --batches 1
prof v2b1-none 0 --batches 1
prof v2b1-side 1 --batches 1
prof v3b1-side 1 --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1
python3 - "$OUT/prof.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    for r in d["runs"]:
        print(d["name"], r["batch"], [(k["name"][:24], k["ms_per_step"]) for k in r["top_kernels"] if "_logits" in k["name"] or "dot_kernel" in k["name"]], r["gpu_idle"]["short_gaps_ms_per_step"])
PY
echo "== $(date +%T) done"
