source .scratch/setup.sh
echo "== $(date +%T) kernel tests: mla decode"
timeout 120 python3 -m pytest -q -x tests/kernel_cases.py -k mla_decode 2>&1 | tail -2
echo "== $(date +%T) mla decode bench"
timeout 150 python3 benchmarks/bench_mla_decode.py --shapes v2lite-small,v2lite,v3-small,v3 --default-only --json-out $OUT/mla_decode.json 2>&1 | grep -v Warn | cut -c1-400 | tail -12
echo "== $(date +%T) dense gemm"
timeout 300 python3 benchmarks/bench_dense_gemm.py --json-out $OUT/dense_gemm.json 2>&1 | grep -v Warn | tail -70
echo "== $(date +%T) end"
