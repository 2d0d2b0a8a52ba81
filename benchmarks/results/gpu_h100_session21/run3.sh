source .scratch/setup.sh >/dev/null
echo "== $(date +%T) disagg 16-core, float32, disagg mode only"
MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1 timeout 110 python3 benchmarks/bench_disagg.py --prefill-cpus 0-7 --decode-cpus 8-13 \
    --colocated-cpus 0-13 --router-cpus 14-15 --client-cpus 14-15 --chats 8 --long-len 2048 --long-every 2 --duration 45 \
    --max-model-len 4096 --max-num-batched-tokens 2048 --modes disagg --json-out "$OUT/disagg_16core.json" 2>&1 | grep -v -i "warn" | tail -8 | cut -c1-400
echo "== $(date +%T) serve to /health"
sed -n '/^python3 -m moeserve.launch.cli serve/,$p' benchmarks/gpu_issue20.sh > /tmp/serve.sh
OUT=$OUT timeout 60 bash /tmp/serve.sh 2>&1 | grep -v "Warn\|warn" | tail -8
echo "== $(date +%T) end"
