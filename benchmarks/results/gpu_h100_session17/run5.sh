source .scratch/setup.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader)
timeout 60 python3 -m pytest -q tests/test_kvstore_units.py 2>&1 | tail -1
python3 - <<'PY'
import torch
pinned = torch.empty(4, 10, dtype=torch.uint8, pin_memory=True)
dest = pinned[:, 2:].view(torch.float16)
src = torch.zeros(4, 4, dtype=torch.float16, device="cuda")
torch.cuda.set_sync_debug_mode("error")
for name, fn in (("strided run", lambda: dest.copy_(src, non_blocking=True)), ("one row", lambda: dest[0].copy_(src[0], non_blocking=True))):
    try:
        fn(); print(name, "no sync")
    except RuntimeError as e:
        print(name, "SYNCS:", str(e)[:80])
torch.cuda.set_sync_debug_mode("default")
PY
rm -rf /tmp/basepkg && mkdir -p /tmp/basepkg && cp -r moeserve /tmp/basepkg/ && cp .scratch/mover_old.py /tmp/basepkg/moeserve/kvstore/mover.py
for code in new old new2; do
  P=$PYTHONPATH; [ $code = old ] && P=/tmp/basepkg:$PYTHONPATH
  echo "== $(date +%T) itl $code"
  PYTHONPATH=$P timeout 150 python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \
    --load-format dummy --prefix-lens "" --itl --max-num-batched-tokens 8192 --json-out $OUT/itl_$code.json 2>&1 | grep -v Warn | tr -d '\n ' | cut -c1-330; echo
done
rm -rf /tmp/baseload && mkdir -p /tmp/baseload && cp -r moeserve /tmp/baseload/ && cp .scratch/store_load_old.py /tmp/baseload/moeserve/kvstore/store_load.py
for n in 4 8; do for code in new old; do
  P=$PYTHONPATH; [ $code = old ] && P=/tmp/baseload:$PYTHONPATH
  PYTHONPATH=$P timeout 70 python3 benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768 --repeats 3 \
    --connections 4,8,16 --servers $n --skip-redis-py --json-out $OUT/load_s${n}_$code.json 2>&1 | grep -A2 '"in-place' | grep -v median | tr -d '\n '; echo " <- servers $n $code"
done; done
echo "== $(date +%T) $GPU done"
