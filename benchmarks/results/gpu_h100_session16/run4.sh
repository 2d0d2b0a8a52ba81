set -uo pipefail
. .scratch/s16_common.sh
# b1: is it the side stream's existence? (a stream made before the engine, side stream off)
echo "== $(date +%T) b1 stream-exists"
MOESERVE_SIDE_STREAM=0 timeout 100 python3 -c "
import sys, runpy, torch
s = torch.cuda.Stream()
sys.argv = ['profile_decode.py', '--batches', '1', '--json-out', '/tmp/p.json']
runpy.run_path('benchmarks/profile_decode.py', run_name='__main__')" 2>&1 | grep '"batch"' | python3 -c "$S" "b1-stream-exists"
prof v2b1-side 1 --batches 1
prof v2-none 0 --batches 1,64,256
prof v3-none 0 --model benchmarks/configs/deepseek_v3_6l --expert-bytes 1 --batches 1,32
echo "== $(date +%T) bench"
MOESERVE_SIDE_STREAM=0 timeout 200 python3 -m moeserve bench --model benchmarks/configs/deepseek_v2_lite --load-format dummy \
    --skip-tokenizer-init --device cuda --num-prompts 64 --input-len 1024 --output-len 128 --json-out "$OUT/bench_v2lite.json" 2>&1 | tail -12
echo "== $(date +%T) done"
