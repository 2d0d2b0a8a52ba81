source .scratch/setup.sh >/dev/null
pp() { if [ $1 = base ]; then echo $PWD/.scratch/base:$PWD/benchmarks:$PWD/tests:/tmp/site; else echo $PWD:$PWD/benchmarks:$PWD/tests:/tmp/site; fi; }
echo "== $(date +%T) kv tests on cuda"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kvstore_writes.py tests/test_kvstore_units.py tests/test_store_load_staged.py -k "cuda or staged" 2>&1 | grep -v "Warn\|warn" | tail -3
itl() { echo "== $(date +%T) itl $1"
  PYTHONPATH=$(pp $1) timeout 110 python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \
    --load-format dummy --prefix-lens "" --itl --max-num-batched-tokens 8192 --json-out $OUT/itl_$1_$2.json 2>&1 | grep -v "Warn\|warn" | tail -1
  python3 -c "import json;d=json.load(open('$OUT/itl_$1_$2.json'));i=d.get('itl',d);print('  $1', json.dumps(i)[:400])"; }
itl base 1; itl new 1; itl base 2; itl new 2
echo "== $(date +%T) hit probe"
timeout 150 python3 benchmarks/results/gpu_h100_session20/probe_hit_steps.py --json-out $OUT/hit_probe.json 2>&1 | grep -v "Warn\|warn\|USDT\|max_model_len" | cut -c1-1500
echo "== $(date +%T) end"
