source .scratch/setup.sh >/dev/null
show() { python3 -c "
import sys,json
for l in sys.stdin:
    if '\"batch\"' not in l: continue
    r=json.loads(l)
    print('  $1 b', r['batch'], 'step', round(r['step_ms_median'],3), 'k/step', r.get('kernels_per_step'), 'err', r['fast_path_error'], 'gaps', r.get('gpu_idle',{}).get('short_gaps_ms_per_step'))"; }
pp() { if [ $1 = new ]; then echo $PWD:$PWD/benchmarks:/tmp/site; else echo $PWD/.scratch/$1:$PWD/benchmarks:/tmp/site; fi; }
for pdl in 1 0; do for v in base new noabsorb nomergeup nonorm; do
  echo "== $(date +%T) v2lite $v pdl$pdl"
  MOESERVE_PDL=$pdl PYTHONPATH=$(pp $v) timeout 60 python3 benchmarks/profile_decode.py --batches 1 --json-out $OUT/prof4_${v}_pdl$pdl.json 2>&1 | show $v
done; done
echo "== $(date +%T) end"
