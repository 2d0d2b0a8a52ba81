source .scratch/setup.sh >/dev/null
pp() { if [ $1 = base ]; then echo $PWD/.scratch/base:$PWD/benchmarks:$PWD/tests:/tmp/site; else echo $PWD:$PWD/benchmarks:$PWD/tests:/tmp/site; fi; }
bench() { local code=$1 name=$2; echo "== $(date +%T) bench $name"
  PYTHONPATH=$(pp $code) timeout 75 python3 -c "import sys; from moeserve.launch.cli import entry; sys.argv[0]='moeserve'; entry()" bench \
    --model benchmarks/configs/deepseek_v2_lite --load-format dummy --skip-tokenizer-init --device cuda --num-prompts 64 \
    --input-len 1024 --output-len 128 --json-out "$OUT/bench_$name.json" 2>&1 | grep -v "Warn\|warn" | tail -2 | cut -c1-300
  python3 -c "import json;d=json.load(open('$OUT/bench_$name.json'));print({k:d[k] for k in ('ttft_p50_s','ttft_p99_s','itl_p50_s','step_ms_p50','elapsed_s')})"; }
bench new v2lite_new
bench base v2lite_base
for code in head new; do
  if [ $code = head ]; then P=$PWD/.scratch/head:$PWD/benchmarks:$PWD/tests:/tmp/site; else P=$PWD:$PWD/benchmarks:$PWD/tests:/tmp/site; fi
  echo "== $(date +%T) load rate alone, $code"
  PYTHONPATH=$P timeout 45 python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 16384 --repeats 3 \
    --connections 4 --servers 4 --skip-redis-py --layerwise --json-out $OUT/load_$code.json 2>&1 | tail -1 >/dev/null
  python3 -c "import json;d=json.load(open('$OUT/load_$code.json'));print({k:(round(v['median_s']*1e3,1), round(v['gb_per_s'],2)) for k,v in d['paths'].items()})"
done
echo "== $(date +%T) end"
