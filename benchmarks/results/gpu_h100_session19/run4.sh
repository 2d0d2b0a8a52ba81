source .scratch/setup.sh >/dev/null
export PYTHONPATH=$PWD/.scratch/nomergeup:$PWD/benchmarks:/tmp/site
echo "== $(date +%T) itl probe (issue 21)"
timeout 150 python3 .scratch/s19_itl.py --json-out $OUT/itl_probe.json 2>&1 | grep -v Warn | cut -c1-3000
echo "== $(date +%T) gpu tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernel_cases*.py \
    tests/test_async_scheduling.py tests/test_backends.py tests/test_disagg_gpu.py tests/test_dummy_fp8.py \
    tests/test_engine.py tests/test_kernels.py tests/test_kvstore_units.py tests/test_store_load_staged.py tests/test_sampling.py tests/test_spec_decode.py \
    -k "cuda or gpu or GPU or kernel or fp8 or closed or shared or kv_rows or staged" 2>&1 | grep -v "Warn\|warn" | tail -12 | tee $OUT/gpu_tests.txt
echo "== $(date +%T) end"
