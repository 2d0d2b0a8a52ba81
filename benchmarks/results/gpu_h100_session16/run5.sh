set -uo pipefail
. .scratch/s16_common.sh
export MOESERVE_SIDE_STREAM=0
for m in "deepseek_v2_lite 64" "deepseek_v3_6l 32"; do set -- $m
echo "== $(date +%T) bench $1"
timeout 240 python3 -c "import sys; from moeserve.launch.cli import entry; sys.argv[0]='moeserve'; entry()" bench --model benchmarks/configs/$1 --load-format dummy \
    --skip-tokenizer-init --device cuda --num-prompts $2 --input-len 1024 --output-len 128 --json-out "$OUT/bench_$1.json" 2>&1 | tail -14
done
echo "== $(date +%T) done"
