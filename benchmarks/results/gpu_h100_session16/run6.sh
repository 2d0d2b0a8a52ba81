set -uo pipefail
. .scratch/s16_common.sh
export PATH=$PWD/.bin/bin:$PATH LD_LIBRARY_PATH=$PWD/.bin/lib
lscpu | grep -E "Model name|^CPU\(s\)"; redis-server --version
echo "== $(date +%T) disagg 16-core"
MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1 timeout 300 python3 benchmarks/bench_disagg.py --prefill-cpus 0-7 --decode-cpus 8-13 \
    --colocated-cpus 0-13 --router-cpus 14-15 --client-cpus 14-15 --chats 8 --long-len 2048 --long-every 2 --duration 45 \
    --max-model-len 4096 --max-num-batched-tokens 2048 --json-out "$OUT/disagg_16core.json" 2>&1 | grep -v -i "warn" | tail -30
echo "== $(date +%T) store writes ITL"
timeout 200 python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite --load-format dummy \
    --prefix-lens "" --itl --max-num-batched-tokens 8192 --json-out "$OUT/kvstore_itl.json" 2>&1 | tail -12
echo "== $(date +%T) done"
