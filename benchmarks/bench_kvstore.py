"""The shared KV store and the host tier: TTFT of a long shared prefix, cold vs loaded, and what writes cost.

Starts its own ``redis-server`` on a free loopback port (the store on TCP), then, per prefix length:
  1. engine A computes ``--repeats`` prompts (a random prefix + 16 tokens) and stores their blocks;
  2. engine B (fresh, its own device cache, no host tier): TTFT of a prompt with a prefix never seen (cold)
     and of a prompt with one of A's prefixes and another suffix (loaded from the store); the cost rule
     stays on, as when serving;
  3. engine C (no store, host tier on, a device cache of one prompt): TTFT of a prefix computed, evicted from
     the device by another prompt, then asked again (loaded from host memory).
With ``--paired N`` (the figure to read for layer-wise loading on a busy machine): N hits from the store and N
from the host tier, each asked of a layer-wise engine and of one that waits, back to back.
With ``--layerwise on,off`` steps 2 and 3 run once per mode (``--kv-layerwise`` / ``--no-kv-layerwise``),
alternating, ``--rounds`` times, with the load average of each run: layer-wise loading against waiting for
the whole load, interleaved on one machine.
``--servers N`` starts N redis-servers and spreads the keys over them (``--kv-store URL,URL,...``: one server's
thread caps a load's rate). Also: stored bytes per token against the latent's size, with tp=1 and (``--tp-check``) tp=2; and
(``--itl``) decode inter-token latency with store writes on and off (``moeserve bench``'s run, random prompts).

CPU (the embedded model, float32, its rotary table stretched to 4096 positions):
    PYTHONPATH=. python benchmarks/bench_kvstore.py --prefix-lens 2048 --repeats 3 --tp-check --max-model-len 4096 \\
        --json-out benchmarks/results/kvstore_cpu.json
GPU (one H200, dummy DeepSeek-V2-Lite, bf16):
    PYTHONPATH=. python benchmarks/bench_kvstore.py --device cuda --model benchmarks/configs/deepseek_v2_lite \\
        --load-format dummy --prefix-lens 8192,32768 --repeats 3 --itl --max-num-batched-tokens 8192 \\
        --json-out benchmarks/results/kvstore_h200_v2lite.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kvstore_engines import SUFFIX, flush, make, rand, release, seed_store, ttft  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from moeserve.launch.cmd_bench import run_benchmark  # noqa: E402


def phase_store(args, url: str, length: int, gen: torch.Generator) -> dict:
    prefixes, vocab, _, _ = seed_store(args, url, f"len{length}", args.repeats, length, gen)
    b = make(args, kv_store=url, kv_host_memory=0, kv_store_salt=f"len{length}",
             kv_load_cost_rule=args.cost_rule == "on")
    cold = [ttft(b, rand(gen, vocab, length + SUFFIX)) for _ in prefixes]
    # NOTE: the cold prompts' own store writes done before the hits: a hit read while they were still being sent
    # shared redis-server's one thread (and this process) with them, and loaded at half the rate (tenth session)
    flush(b)
    hit = [ttft(b, p + rand(gen, vocab, SUFFIX)) for p in prefixes]
    snap = b.kv.connector.snapshot()
    release(b)
    del b
    gbps = snap["store_bytes_read"] / snap["load_s_sum"] / 1e9 if snap["load_s_sum"] else 0.0
    num_loads = sum(snap["load_s_buckets"])
    # a rank's own time to load a prefix (on its loader thread): what layer-wise loading could hide at most
    load_s = snap["load_s_sum"] / num_loads if num_loads else 0.0
    return {"ttft_cold_s": cold, "ttft_store_s": hit, "store_load_s_mean": load_s,
            "store_hit_tokens": snap["store_hit_tokens"], "store_hit_tokens_per_hit": snap["store_hit_tokens"] / len(hit),
            "load_s_buckets": snap["load_s_buckets"],
            "loads_skipped_by_cost_rule": snap["loads_skipped"], "store_load_gb_per_s": gbps,
            "store_vs_cold": statistics.median(hit) / statistics.median(cold)}


def phase_host(args, length: int, gen: torch.Generator) -> dict:
    probe = make(args, kv_host_memory=0)
    block_bytes = probe.config.effective_block_size * probe.executor.runner.cache_bytes_per_token
    vocab, bs = probe.model_config.vocab_size, probe.config.effective_block_size
    release(probe)
    del probe
    blocks = -(-(length + 2 * SUFFIX) // bs) + 1  # one prompt at a time in the device cache
    c = make(args, kv_cache_memory=blocks * block_bytes, kv_host_memory=max(1 << 30, 4 * blocks * block_bytes))
    cold, hit = [], []
    for _ in range(args.repeats):
        p = rand(gen, vocab, length)
        cold.append(ttft(c, p + rand(gen, vocab, SUFFIX)))
        ttft(c, rand(gen, vocab, length + SUFFIX))  # evicts p's blocks from the device
        hit.append(ttft(c, p + rand(gen, vocab, SUFFIX)))
    stats, device_hits = c.kv.connector.stats, c.kv.num_prefix_hit_tokens
    release(c)
    del c
    return {"ttft_cold_s": cold, "ttft_host_s": hit, "host_hit_tokens": stats.host_hit_tokens,
            "device_hit_tokens": device_hits, "host_vs_cold": statistics.median(hit) / statistics.median(cold)}


def paired(args, url: str, length: int, gen: torch.Generator) -> dict:
    """Layer-wise on against off, hit by hit: two engines of each kind in one process, each hit asked of both
    in turn (which goes first alternates), so that the machine's load swings hit both sides of a pair alike."""
    prefixes, vocab, bs, per_token = seed_store(args, url, f"paired{length}", args.paired, length, gen)
    block_bytes = bs * per_token
    out: dict = {}
    blocks = -(-(length + 2 * SUFFIX) // bs) + 1  # the host phase: one prompt at a time in the device cache
    kinds = {"store": dict(kv_store=url, kv_host_memory=0, kv_store_salt=f"paired{length}", kv_load_cost_rule=False),
             "host": dict(kv_cache_memory=blocks * block_bytes, kv_host_memory=max(1 << 30, 4 * blocks * block_bytes))}
    for kind, kw in kinds.items():
        engines = {mode: make(args, kv_layerwise=mode == "on", **kw) for mode in ("on", "off")}
        hits: dict[str, list[float]] = {"on": [], "off": []}
        for i, p in enumerate(prefixes):
            if kind == "host":  # computed, then evicted from the device by another prompt, on both
                for e in engines.values():
                    ttft(e, p + rand(gen, vocab, SUFFIX))
                    ttft(e, rand(gen, vocab, length + SUFFIX))
            suffix = rand(gen, vocab, SUFFIX)
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                hits[mode].append(ttft(engines[mode], p + suffix))
        stats = {m: e.kv.connector.stats for m, e in engines.items()}
        for e in engines.values():
            release(e)
        ratios = [x / y for x, y in zip(hits["on"], hits["off"])]
        out[kind] = {"ttft_on_s": hits["on"], "ttft_off_s": hits["off"], "on_over_off": ratios,
                     "median_on_s": statistics.median(hits["on"]), "median_off_s": statistics.median(hits["off"]),
                     "min_on_s": min(hits["on"]), "min_off_s": min(hits["off"]),
                     "median_on_over_off": statistics.median(ratios), "loadavg_1m": os.getloadavg()[0],
                     "layerwise_loads": {m: s.layerwise_loads for m, s in stats.items()},
                     "hit_tokens": {m: s.store_hit_tokens + s.host_hit_tokens for m, s in stats.items()}}
    return out


def stored_bytes(args, url: str, servers: list[RedisServer], tp: int, gen: torch.Generator) -> dict:
    salt = f"bytes-tp{tp}"
    e = make(args, kv_store=url, kv_host_memory=0, kv_store_salt=salt, tp=tp)
    ids = rand(gen, e.model_config.vocab_size, 8 * e.config.effective_block_size + 1)
    ttft(e, ids)
    flush(e)
    layout = e.kv.connector.config.layouts[0]
    per_token_latent = e.model_config.num_hidden_layers * e.model_config.kv_cache_dim * e.config.torch_dtype.itemsize
    release(e)  # workers finish their writes
    del e
    keys = [(s, k) for s in servers for k in s.cli("--scan", "--pattern", f"{layout.key_prefix}*").split()]
    total = sum(int(s.cli("strlen", k)) for s, k in keys)
    tokens = len(keys) * layout.block_size
    return {"tp": tp, "keys": len(keys), "value_bytes": total, "bytes_per_token": total / max(1, tokens),
            "latent_bytes_per_token": per_token_latent}


def itl(args, url: str) -> dict:
    out = {}
    # the host tier is on in both: the runs differ only by the store's writes
    for name, kw in (("store_off", {}), ("store_on", {"kv_store": url, "kv_store_salt": "itl"})):
        e = make(args, **kw)
        r = run_benchmark(e, args.itl_prompts, args.itl_input_len, args.itl_output_len, progress=False)
        release(e)
        del e
        out[name] = {"itl_p50_s": r["itl_p50_s"], "itl_p99_s": r["itl_p99_s"],
                     "output_tokens_per_s": r["output_tokens_per_s"]}
    out["itl_p99_ratio"] = out["store_on"]["itl_p99_s"] / out["store_off"]["itl_p99_s"]
    return out


def summary(prefix: dict) -> dict:
    """Per prefix length and mode: medians over every run's TTFTs, and the hit / cold ratios."""
    out: dict = {}
    for length, by_mode in prefix.items():
        for mode, runs in by_mode.items():
            med = {f"{phase}_{k}": statistics.median([t for r in runs for t in r[phase][f"ttft_{k}_s"]])
                   for phase, k in (("store", "cold"), ("store", "store"), ("host", "cold"), ("host", "host"))}
            out[f"{length}/{mode}"] = {
                "store_cold_s": med["store_cold"], "store_hit_s": med["store_store"], "host_cold_s": med["host_cold"],
                "host_hit_s": med["host_host"],
                "store_load_s": statistics.median([r["store"]["store_load_s_mean"] for r in runs]),
                "store_hits_s": [t for r in runs for t in r["store"]["ttft_store_s"]],
                "host_hits_s": [t for r in runs for t in r["host"]["ttft_host_s"]],
                "loadavg_1m": [r["loadavg_1m"] for r in runs]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--block-size", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=0,
                   help="past the model's own context (the embedded model's is 512): a longer rotary table")
    p.add_argument("--prefix-lens", default="2048", help="comma-separated; empty: none (e.g. --itl alone)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp-check", action="store_true", help="stored bytes per token with tp=2 as well")
    p.add_argument("--itl", action="store_true", help="decode ITL with store writes on and off")
    p.add_argument("--itl-prompts", type=int, default=32)
    p.add_argument("--itl-input-len", type=int, default=512)
    p.add_argument("--itl-output-len", type=int, default=256)
    p.add_argument("--cost-rule", choices=("on", "off"), default="on",
                   help="the store hits' engine skips loads it measures slower than recomputing (on, as when "
                        "serving), or loads every hit (off: every hit's load is timed)")
    p.add_argument("--layerwise", default="on", help="on, off, or on,off: each in turn (interleaved)")
    p.add_argument("--rounds", type=int, default=1, help="times the --layerwise modes alternate (0: none)")
    p.add_argument("--paired", type=int, default=0,
                   help="N: also N store hits and N host-tier hits, each asked of a layer-wise engine and of one "
                        "that waits for the whole load, in turn (paired, in one process)")
    p.add_argument("--servers", type=int, default=1, help="redis-servers the keys are spread over")
    p.add_argument("--store-connections", type=int, default=4, help="--kv-store-connections: a load's reading threads")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    result: dict = {"args": vars(args) | {"json_out": str(args.json_out)}, "prefix": {}}
    with ExitStack() as servers:
        # keys spread over --servers redis-servers (--kv-store URL,URL,...)
        started = [servers.enter_context(RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))))
                   for _ in range(args.servers)]
        for s in started:
            s.cli("config", "set", "maxmemory", "0")  # no eviction during the benchmark
        url = ",".join(s.url for s in started)
        for length in map(int, filter(None, args.prefix_lens.split(","))):
            result["prefix"][length] = by_mode = {}
            for _ in range(args.rounds):
                for mode in args.layerwise.split(","):
                    margs = argparse.Namespace(**vars(args), kv_layerwise=mode == "on")
                    run = {"store": phase_store(margs, url, length, gen), "host": phase_host(margs, length, gen),
                           "loadavg_1m": os.getloadavg()[0]}
                    by_mode.setdefault(mode, []).append(run)
                    print(json.dumps({length: {mode: run}}, indent=1), flush=True)
            result["summary"] = summary(result["prefix"])
            print(json.dumps(result["summary"], indent=1), flush=True)
            if args.paired:
                result.setdefault("paired", {})[length] = paired(args, url, length, gen)
                print(json.dumps({"paired": result["paired"][length]}, indent=1), flush=True)
        if args.prefix_lens:
            result["stored_bytes"] = [stored_bytes(args, url, started, tp, gen)
                                      for tp in ((1, 2) if args.tp_check else (1,))]
            print(json.dumps(result["stored_bytes"], indent=1), flush=True)
        if args.itl:
            result["itl"] = itl(args, url)
            print(json.dumps(result["itl"], indent=1), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
