rm -rf /tmp/basepkg && mkdir -p /tmp/basepkg && cp -r moeserve /tmp/basepkg/ && cp .scratch/mover_old.py /tmp/basepkg/moeserve/kvstore/mover.py
timeout 60 python3 -m pytest -q tests/test_kvstore_writes.py tests/test_kvstore_units.py 2>&1 | tail -1
cat > /tmp/waits.py <<'PY'
import torch
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.latent_cache import allocate_latent_caches
from moeserve.kvstore.mover import BlockMover
from moeserve.kvstore.prefix import block_hashes
from moeserve.kvstore.store import MemoryStore
LAYOUT = BlockLayout("0123456789abcdef0123456789abcdef", "float32", 4, 0, 0, 2, 3)
caches = allocate_latent_caches([0, 1], 16, 4, 3, torch.float32, torch.device("cuda"))
mover = BlockMover(caches, LAYOUT, 8, MemoryStore(), write_queue_bytes=8 * LAYOUT.payload_bytes)
tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(6)]
hashes = block_hashes([t for b in tokens for t in b], 4)
torch.cuda.synchronize(); torch.cuda._sleep(2_000_000_000); busy = torch.cuda.Event(); busy.record()
mover.save([3, 4, 5, 9, 10, 11], [0, 1, 2, 5, 6, 7], hashes, tokens, [True] * 6)
print(mover.__module__, "save waited for the device:", busy.query())
PY
python3 /tmp/waits.py 2>&1 | tail -1
PYTHONPATH=/tmp/basepkg:$PYTHONPATH python3 /tmp/waits.py 2>&1 | tail -1
for code in new old; do
  P=$PYTHONPATH; [ $code = old ] && P=/tmp/basepkg:$PYTHONPATH
  echo "== $(date +%T) itl $code"
  PYTHONPATH=$P timeout 150 python3 benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \
    --load-format dummy --prefix-lens "" --itl --max-num-batched-tokens 8192 --json-out $OUT/itl_$code.json 2>&1 | grep -v Warn | tr -d '\n ' | cut -c1-330; echo
done
timeout 100 python3 .scratch/probe_itl.py --variants off-new,on-new --json-out $OUT/itl_probe_new.json 2>&1 | grep -v Warning | cut -c1-200 | tail -3
