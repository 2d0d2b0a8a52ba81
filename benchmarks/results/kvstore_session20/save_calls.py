"""Issue 21, twentieth session: how many saves the ranks get, and their host time, with store writes on.

``moeserve bench``'s run (32 prompts of 128 tokens, 64 out) on the embedded model on CPU, store writes to a
redis-server on loopback; every ``BlockMover.save`` call counted and timed. Run from the repository root:
``python benchmarks/results/kvstore_session20/save_calls.py`` (with another checkout first on ``PYTHONPATH`` for
the code before the change).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
import kvstore_engines as ke  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from moeserve.kvstore import mover  # noqa: E402
from moeserve.launch.cmd_bench import run_benchmark  # noqa: E402

CALLS: list[tuple[int, float]] = []  # (blocks, host seconds) of each save
_save = mover.BlockMover.save


def timed(self, blocks, *a, **k):
    t = time.perf_counter()
    _save(self, blocks, *a, **k)
    CALLS.append((len(blocks), time.perf_counter() - t))


mover.BlockMover.save = timed
args = argparse.Namespace(model="", device="cpu", dtype="auto", load_format="auto", max_num_batched_tokens=2048,
                          block_size=0, max_model_len=0, kv_layerwise=False, store_connections=4)
with RedisServer(Path(tempfile.mkdtemp())) as server:
    e = ke.make(args, kv_store=server.url, kv_store_salt="x")
    CALLS.clear()
    r = run_benchmark(e, 32, 128, 64, progress=False)
    ke.flush(e)
    snap = e.kv.connector.snapshot()
    ke.release(e)
n = [c[0] for c in CALLS]
print(json.dumps({"save_calls": len(CALLS), "blocks": sum(n), "blocks_per_call_max": max(n),
                  "save_ms_total": round(sum(c[1] for c in CALLS) * 1e3, 1),
                  "writes_dropped": snap["writes_dropped"], "store_bytes_written": snap["store_bytes_written"],
                  "itl_p50_ms": round(r["itl_p50_s"] * 1e3, 2), "itl_p99_ms": round(r["itl_p99_s"] * 1e3, 2)}))
