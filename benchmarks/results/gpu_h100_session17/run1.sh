source .scratch/setup.sh
python3 -c "import xxhash, redis; print('deps ok')"
timeout 90 python3 .scratch/probe_copies.py > $OUT/copies.json 2>&1; tail -40 $OUT/copies.json
timeout 330 python3 .scratch/probe_itl.py --json-out $OUT/itl_variants.json 2>&1 | grep -v Warning | tail -12
for n in 1 2 4; do
  timeout 70 python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768 --repeats 3 \
    --connections 4,8 --servers $n --skip-redis-py --json-out $OUT/load_servers$n.json 2>&1 | grep -A8 '"paths"'
done
