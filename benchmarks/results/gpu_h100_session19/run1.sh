source .scratch/setup.sh >/dev/null
echo "== $(date +%T) new kernel cases on the GPU"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernel_cases_mla.py tests/kernel_cases_moe.py tests/kernel_cases.py tests/kernel_cases_check.py \
   -k "absorb or up_projects or norm_and_router or router or engine_with_kernels or mla_decode or kv_rows" 2>&1 | grep -v "Warn\|warn" | tail -8
show() { python3 -c "
import sys,json
for l in sys.stdin:
    if '\"batch\"' not in l: continue
    r=json.loads(l); tk={k['name'][:22]:(k['ms_per_step'],k['launches_per_step']) for k in r.get('top_kernels',[])[:9]}
    print('  $1 b', r['batch'], 'step', round(r['step_ms_median'],3), 'k/step', r.get('kernels_per_step'), 'err', r['fast_path_error'], json.dumps(tk))"; }
pp() { if [ $1 = base ]; then echo $PWD/.scratch/base:$PWD/benchmarks:/tmp/site; else echo $PWD:$PWD/benchmarks:/tmp/site; fi; }
v2() { for v in base new; do echo "== $(date +%T) v2lite $v $1"
  PYTHONPATH=$(pp $v) timeout 80 python3 benchmarks/profile_decode.py --batches 1,4 --json-out $OUT/prof_v2_${v}_$1.json 2>&1 | show $v; done; }
v2 1
for v in base new; do
  echo "== $(date +%T) v3 $v"
  PYTHONPATH=$(pp $v) timeout 90 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1,4 --json-out $OUT/prof_v3_$v.json 2>&1 | show $v
done
echo "== $(date +%T) itl probe (issue 21)"
timeout 170 python3 .scratch/s19_itl.py --json-out $OUT/itl_probe.json 2>&1 | grep -v Warn | cut -c1-2500
v2 2
echo "== $(date +%T) end"
