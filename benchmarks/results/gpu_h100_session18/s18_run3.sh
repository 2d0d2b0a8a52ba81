source .scratch/setup.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__, torch.version.cuda)"
echo "== $(date +%T) pdl probe"
timeout 100 python3 .scratch/probe_pdl.py 60 $OUT/pdl_probe.json 2>&1 | grep -v Warn | cut -c1-900 | tail -8
summ() { python3 -c "
import sys,json
for l in sys.stdin:
    l=l.strip()
    if l.startswith('{'):
        try: r=json.loads(l)
        except Exception: print(l[:200]); continue
        c=r.get('ms_per_step_by_class',{})
        print('  b', r.get('batch'), 'step', round(r.get('step_ms_median',0),3), 'err', r.get('fast_path_error'), 'kern', r.get('kernels_per_step'), 'busy', r.get('gpu_busy_ms_per_step'), 'gaps', r.get('gpu_idle',{}).get('short_gaps_ms_per_step'))
    elif 'Error' in l or 'error' in l: print(l[:300])"; }
for p in 0 1 0 1; do
  echo "== $(date +%T) v2 pdl=$p"
  MOESERVE_PDL=$p timeout 110 python3 benchmarks/profile_decode.py --batches 1,64 --json-out $OUT/prof_v2_pdl${p}_$(date +%s).json 2>&1 | summ
done
for p in 0 1; do
  echo "== $(date +%T) v3 pdl=$p"
  MOESERVE_PDL=$p timeout 120 python3 benchmarks/profile_decode.py --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1,32 2>&1 | summ
done
echo "== $(date +%T) kernel tests pdl=1"
MOESERVE_PDL=1 timeout 150 python3 -m pytest -q -x tests/kernel_cases.py tests/kernel_cases_moe.py 2>&1 | tail -3
echo "== $(date +%T) end"
