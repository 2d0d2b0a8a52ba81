source .scratch/setup.sh >/dev/null
show() { python3 -c "
import sys,json
for l in sys.stdin:
    if '\"batch\"' not in l: continue
    r=json.loads(l)
    print('  $1 b', r['batch'], 'step', round(r['step_ms_median'],3), 'k/step', r.get('kernels_per_step'), 'err', r['fast_path_error'])"; }
pp() { echo $PWD/.scratch/$1:$PWD/benchmarks:/tmp/site; }
for v in base nomergeup base nomergeup; do
  echo "== $(date +%T) v2lite b4 $v"; PYTHONPATH=$(pp $v) timeout 60 python3 benchmarks/profile_decode.py --batches 4 2>&1 | show $v
done
for v in base nomergeup; do
  echo "== $(date +%T) v3 $v"; PYTHONPATH=$(pp $v) timeout 80 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1,4 2>&1 | show $v
done
echo "== $(date +%T) kvstore layerwise groups (4 servers)"
PYTHONPATH=$(pp nomergeup) timeout 200 python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \
    --load-format dummy --prefix-lens 8192,32768 --repeats 2 --max-num-batched-tokens 8192 --max-model-len 40960 \
    --servers 4 --cost-rule off --layerwise on,off --json-out $OUT/kvstore_layerwise_groups.json 2>&1 | grep -v Warn | grep -A30 '"summary"' | head -40 | cut -c1-300
echo "== $(date +%T) end"
