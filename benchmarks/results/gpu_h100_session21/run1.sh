# session 21, the one short lease left: the new GPU test, the decode profiles of the landed code, start-up to /health
source .scratch/setup.sh >/dev/null
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; lscpu | grep "Model name"
show() { python3 -c "
import sys,json
for l in sys.stdin:
    if '\"batch\"' not in l: continue
    r=json.loads(l); tk={k['name'][:22]:(k['ms_per_step'],k['launches_per_step']) for k in r.get('top_kernels',[])[:6]}
    print('  b', r['batch'], 'step', round(r['step_ms_median'],3), 'k/step', r.get('kernels_per_step'), 'err', r['fast_path_error'], 'floor', round(r['hbm_floor']['floor_ms'],3), json.dumps(tk))"; }
echo "== $(date +%T) the start-up check on the served shapes (new test)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fast_path_shapes.py -rfE 2>&1 | grep -v "Warn\|warn" | tail -12 | tee $OUT/test_fast_path_shapes.txt
echo "== $(date +%T) profile v2lite"
timeout 110 python3 benchmarks/profile_decode.py --batches 1,64,256 --json-out $OUT/prof_v2.json 2>&1 | show
echo "== $(date +%T) profile v3"
timeout 70 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1,32 --json-out $OUT/prof_v3.json 2>&1 | show
echo "== $(date +%T) end"
