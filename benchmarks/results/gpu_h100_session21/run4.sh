source .scratch/setup.sh >/dev/null
echo "== $(date +%T) serve to /health"
sed -n '/^python3 -m moeserve.launch.cli serve/,$p' benchmarks/gpu_issue20.sh > /tmp/serve.sh
OUT=$OUT timeout 50 bash /tmp/serve.sh 2>&1 | grep -v "Warn\|warn" | tail -8
echo "== $(date +%T) end"
