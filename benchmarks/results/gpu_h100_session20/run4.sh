source .scratch/setup.sh >/dev/null
pp() { if [ $1 = base ]; then echo $PWD/.scratch/base:$PWD/benchmarks:$PWD/tests:/tmp/site; else echo $PWD:$PWD/benchmarks:$PWD/tests:/tmp/site; fi; }
echo "== $(date +%T) engine kernel case on the GPU (graphs; the prefix hit as decode rows)"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/kernel_cases_engine.py -k "matches_eager and tiny" 2>&1 | grep -v "Warn\|warn" | grep "passed\|failed\|Error\|assert\|gap" | tail -6
probe() { echo "== $(date +%T) hit probe $1 $2 $3"
  PYTHONPATH=$(pp $1) timeout $4 python3 benchmarks/results/gpu_h100_session20/probe_hit_steps.py --length $2 $3 --json-out $OUT/hit_$1_$2.json 2>&1 | grep "^host\|^store" | cut -c1-420; }
probe base 8192 "" 100; probe new 8192 "" 100
probe base 32768 --no-store 80; probe new 32768 --no-store 80
echo "== $(date +%T) end"
