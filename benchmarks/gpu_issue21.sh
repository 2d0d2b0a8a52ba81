#!/usr/bin/env bash
# Issue 21's GPU figures on one H200: the store's load rate into device blocks (old path vs in place, several
# connections), then TTFT cold vs from the store vs from the host tier in the engine, with decode ITL with
# store writes on and off, and what store writes cost the thread that runs the steps (bench_kvstore_writes.py). Needs
# `redis-server` and `redis-cli` on PATH: where the machine has none, carry the binaries of Debian's redis-tools
# (redis-server is its redis-check-rdb) and liblzf.so.1, with LD_LIBRARY_PATH pointing at the library.
# Results in $OUT (default out/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout ${LOAD_S:-120} python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768 \
    --repeats 3 --connections 1,2,4,8 --json-out "$OUT/kvstore_load_h200_v2lite.json" 2>&1 | tail -12
# the same reader beside a Python thread that holds the GIL 30% of the time (an engine loop's stand-in), and with
# redis-server's io-threads (its replies sent by 4 threads)
timeout ${LOAD_S:-120} python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768 \
    --repeats 3 --connections 4,8 --busy 0.3 --skip-redis-py --json-out "$OUT/kvstore_load_busy.json" 2>&1 | tail -8
timeout ${LOAD_S:-120} python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768 \
    --repeats 3 --connections 4,8 --redis-io-threads 4 --skip-redis-py --json-out "$OUT/kvstore_load_io4.json" 2>&1 | tail -8
# keys spread over 2 and 4 redis-servers (--kv-store URL,URL,...)
for n in 2 4; do
    timeout ${LOAD_S:-120} python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768 \
        --repeats 3 --connections 4,8 --servers $n --skip-redis-py --json-out "$OUT/kvstore_load_servers$n.json" 2>&1 |
        tail -8
done
timeout ${TTFT_S:-300} python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \
    --load-format dummy --prefix-lens 8192,32768 --repeats 3 --itl --max-num-batched-tokens 8192 \
    --max-model-len 40960 --json-out "$OUT/kvstore_h200_v2lite.json" 2>&1 | tail -25
timeout ${WRITES_S:-120} python3 benchmarks/bench_kvstore_writes.py --device cuda --shape v2-lite \
    --json-out "$OUT/kvstore_writes_h200.json" 2>&1 | tail -4
