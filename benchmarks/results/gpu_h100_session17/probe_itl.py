"""ITL with store writes: which steps are slow, and what each part of the write path costs (variants).

A record of runs 1-6: it patches BlockMover internals as they were then (5f2d0be) and does not run on later code."""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
import bench_kvstore as bk
from redis_server import RedisServer

from moeserve.coordinator.sampling import SamplingParams
from moeserve.kvstore import mover
from moeserve.kvstore import store as store_mod


def run(e, n=32, inp=512, outl=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = e.model_config.vocab_size
    params = SamplingParams(max_tokens=outl, temperature=0.0, ignore_eos=True)
    for i in range(n):
        e.add_request(f"b{i}", prompt_token_ids=torch.randint(0, vocab, (inp,), generator=gen).tolist(), params=params)
    last, itl, steps, phases = {}, [], [], []
    SAVE_S.clear()
    ms0 = torch.cuda.memory_stats()
    t_prev = time.perf_counter()
    while e.has_unfinished():
        before = dict(e.stats.phase_s)
        outs = e.step()
        now = time.perf_counter()
        phases.append({k: round((v - before[k]) * 1e3, 2) for k, v in e.stats.phase_s.items() if v - before[k] > 2e-4})
        steps.append(round((now - t_prev) * 1e3, 2))
        t_prev = now
        for o in outs:
            if o.request_id in last:
                itl.append(now - last[o.request_id])
            last[o.request_id] = now
    itl.sort()
    def p(q):
        return itl[min(len(itl) - 1, int(q / 100 * len(itl)))] * 1e3
    return {"itl_p50_ms": p(50), "itl_p99_ms": p(99), "itl_max_ms": itl[-1] * 1e3,
            "steps_first12_ms": steps[:12], "slow_steps": [(i, s) for i, s in enumerate(steps) if s > 1.1 * statistics.median(steps)][:40],
            "step_p50_ms": statistics.median(steps),
            "phases_slow": {i: phases[i] for i, s in enumerate(steps) if i > 3 and s > 1.1 * statistics.median(steps)},
            "phases_typical": phases[min(100, len(phases) - 1)], "save_ms": [round(x * 1e3, 2) for x in SAVE_S][:40],
            "mem": {k: ms1 - ms0.get(k, 0) for k, ms1 in torch.cuda.memory_stats().items()
                    if any(w in k for w in ("retries", "sync_all", "device_alloc", "device_free", "ooms"))}}

SAVE_S = []
_new_save = mover.BlockMover.save

def timed(fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        fn(*a, **k)
        SAVE_S.append(time.perf_counter() - t)
    return wrapper

def old_save(self, blocks, host_slots, hashes, tokens, to_store):
    """The code before this session: one gather for the host tier, another for the store."""
    pairs = [(b, s) for b, s in zip(blocks, host_slots) if s >= 0]
    if pairs and self.host is not None:
        bl = [b for b, _ in pairs]
        self._copy_out(self._gather(bl), [(self.host, list(range(len(bl))), [s for _, s in pairs])])
    chosen = [i for i, flag in enumerate(to_store) if flag]
    if self.writes and chosen:
        slots = self._take_write_slots(len(chosen))
        if slots:
            ev = self._copy_out(self._gather([blocks[i] for i in chosen]), [(self._slot_latent, list(range(len(chosen))), slots)])
            self._queue.put(([hashes[i] for i in chosen], [tokens[i] for i in chosen], slots, ev))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="off-old-whole,off-pieces,on-old-whole,on-pieces,on-whole,on-old-whole-nowriter")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    args = argparse.Namespace(model="benchmarks/configs/deepseek_v2_lite", device="cuda", dtype="auto", load_format="dummy",
                              max_num_batched_tokens=8192, block_size=0, max_model_len=0, kv_layerwise=False, store_connections=4)
    orig_put, orig_encode = store_mod.RedisStore.put, mover.encode_block_into
    out = {}
    with RedisServer(Path(tempfile.mkdtemp())) as server:
        server.cli("config", "set", "maxmemory", "0")
        for v in a.variants.split(","):
            mover.SAVE_COPY_BYTES = 0 if "whole" in v else 4 << 20
            mover.BlockMover.save = timed(old_save if "old" in v else _new_save)
            store_mod.RedisStore.put = (lambda self, items: None) if ("noput" in v or "nowriter" in v) else orig_put
            mover.encode_block_into = (lambda *x: None) if "nowriter" in v else orig_encode
            kw = {"kv_store": server.url, "kv_store_salt": v} if v.startswith("on") else {}
            e = bk.make(args, **kw)
            run(e, n=8, outl=16, seed=1)  # warm
            out[v] = r = run(e)
            bk.release(e)
            del e
            print(v, json.dumps(r), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))

main()
