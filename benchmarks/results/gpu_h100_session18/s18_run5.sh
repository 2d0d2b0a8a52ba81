source .scratch/setup.sh >/dev/null
echo "== $(date +%T) kvstore writes tests"
timeout 90 python3 -m pytest -q tests/test_kvstore_writes.py 2>&1 | grep -v "Warn\|warn" | tail -15
for i in 1; do
  echo "== $(date +%T) itl paced $i"
  timeout 120 python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \
    --load-format dummy --prefix-lens "" --itl --max-num-batched-tokens 8192 --json-out $OUT/itl_paced_$i.json 2>&1 | grep -v Warn | tr -d '\n ' | cut -c1-330; echo
done
for p in 0 1; do
  echo "== $(date +%T) v2 b256 pdl=$p"
  MOESERVE_PDL=$p timeout 60 python3 benchmarks/profile_decode.py --batches 256 --json-out $OUT/prof_v2_b256_pdl$p.json 2>&1 | grep '"batch"' | python3 -c "
import sys,json
for l in sys.stdin:
    r=json.loads(l); print('  b', r['batch'], 'step', round(r['step_ms_median'],3), 'err', r['fast_path_error'])"
done
echo "== $(date +%T) gpu tests with PDL"
MOESERVE_PDL=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_async_scheduling.py tests/test_backends.py tests/test_disagg_gpu.py tests/test_dummy_fp8.py \
    tests/test_engine.py tests/test_store_load_staged.py tests/test_sampling.py tests/test_spec_decode.py tests/test_kvstore_units.py \
    -k "cuda or gpu or GPU or kernel or fp8 or closed or shared or kv_rows or staged" 2>&1 | grep -v "Warn\|warn" | tail -12
echo "== $(date +%T) end"
