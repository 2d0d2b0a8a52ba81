set -uo pipefail
. .scratch/s16_common.sh
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
echo "== $(date +%T) tests"
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/kernel_cases*.py \
    tests/test_async_scheduling.py tests/test_backends.py tests/test_disagg_gpu.py tests/test_dummy_fp8.py \
    tests/test_engine.py tests/test_kernels.py tests/test_kvstore_units.py tests/test_store_load_staged.py tests/test_sampling.py tests/test_spec_decode.py tests/test_side_streams.py \
    -k "cuda or gpu or GPU or kernel or fp8 or closed or shared or kv_rows or staged or side" > "$OUT/gpu_tests.txt" 2>&1
tail -25 "$OUT/gpu_tests.txt"
V3="--model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1,32"
prof v3-none 0 $V3
prof v3-all "" $V3
echo "== $(date +%T) done"
