"""Issue 21: where a prefix hit's TTFT goes besides the load (twentieth session).

Run from the repository root on a GPU host with redis-server on PATH:
``python probe_hit_steps.py --json-out hit_probe.json``. V2-Lite dummy, an 8k-token prefix: a host-tier hit (the
prefix computed, evicted from the device by another prompt, asked again) and a store hit (four servers, the cost
rule off). For each hit: every engine step until the first token (its wall time, its phases, the scheduler's
running/waiting counts), and the torch profiler over the whole hit (host ops and device kernels).
"""

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
import kvstore_engines as ke  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from moeserve.coordinator.sampling import SamplingParams  # noqa: E402


def summary(p) -> dict:
    ka = p.key_averages()
    by_cpu = sorted(ka, key=lambda k: -k.self_cpu_time_total)[:16]
    by_dev = sorted(ka, key=lambda k: -getattr(k, "self_device_time_total", 0))[:14]
    return {"cpu": [(k.key[:70], round(k.self_cpu_time_total / 1e3, 3), k.count) for k in by_cpu],
            "dev": [(k.key[:70], round(getattr(k, "self_device_time_total", 0) / 1e3, 3), k.count) for k in by_dev]}


def hit(e, ids: list[int], profile: bool) -> dict:
    steps = []
    p = None
    if profile:
        p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                   + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
        p.__enter__()
    start = time.perf_counter()
    e.add_request(f"h{time.monotonic_ns()}", prompt_token_ids=ids, params=SamplingParams(max_tokens=1, ignore_eos=True))
    added = time.perf_counter()
    while e.has_unfinished():
        before = dict(e.stats.phase_s)
        t0 = time.perf_counter()
        e.step()
        t1 = time.perf_counter()
        steps.append({"ms": round((t1 - t0) * 1e3, 2), "at_ms": round((t1 - start) * 1e3, 2),
                      "phases": {k: round((v - before.get(k, 0)) * 1e3, 2) for k, v in e.stats.phase_s.items()
                                 if v - before.get(k, 0) > 1e-4}})
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    out = {"ttft_ms": round(total * 1e3, 2), "add_ms": round((added - start) * 1e3, 2), "steps": steps}
    if p is not None:
        p.__exit__(None, None, None)
        out["prof"] = summary(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--device", default="cuda", help="cpu: the embedded model (a check of the probe itself)")
    ap.add_argument("--no-store", action="store_true", help="host-tier hits only")
    a = ap.parse_args()
    gpu = a.device == "cuda"
    args = argparse.Namespace(model="benchmarks/configs/deepseek_v2_lite" if gpu else "", device=a.device,
                              dtype="auto", load_format="dummy" if gpu else "auto", max_num_batched_tokens=8192, block_size=0, max_model_len=40960,
                              kv_layerwise=False, store_connections=4)
    gen = torch.Generator().manual_seed(0)
    n = a.length
    out: dict = {}
    # the host tier: a device cache of one prompt, so that a second prompt evicts the first
    probe = ke.make(args, kv_host_memory=0)
    block_bytes = probe.config.effective_block_size * probe.executor.runner.cache_bytes_per_token
    vocab, bs = probe.model_config.vocab_size, probe.config.effective_block_size
    ke.release(probe)
    del probe
    blocks = -(-(n + 2 * ke.SUFFIX) // bs) + 1
    c = ke.make(args, kv_cache_memory=blocks * block_bytes, kv_host_memory=max(1 << 30, 4 * blocks * block_bytes))
    for i in range(3):
        p = ke.rand(gen, vocab, n)
        cold = hit(c, p + ke.rand(gen, vocab, ke.SUFFIX), profile=False)
        ke.ttft(c, ke.rand(gen, vocab, n + ke.SUFFIX))
        out[f"host{i}"] = {"cold": cold, "hit": hit(c, p + ke.rand(gen, vocab, ke.SUFFIX), profile=i == 2)}
        print("host", i, "cold", cold["ttft_ms"], "hit", out[f"host{i}"]["hit"]["ttft_ms"],
              json.dumps(out[f"host{i}"]["hit"]["steps"])[:800], flush=True)
    ke.release(c)
    del c
    if a.no_store:
        finish(out, a.json_out)
        return
    with ExitStack() as stack:
        servers = [stack.enter_context(RedisServer(Path(tempfile.mkdtemp()))) for _ in range(4)]
        for s in servers:
            s.cli("config", "set", "maxmemory", "0")
        url = ",".join(s.url for s in servers)
        prefixes, vocab, _, _ = ke.seed_store(args, url, "hit", 3, n, gen)
        b = ke.make(args, kv_store=url, kv_host_memory=0, kv_store_salt="hit", kv_load_cost_rule=False)
        for i, p in enumerate(prefixes):
            cold = hit(b, ke.rand(gen, vocab, n + ke.SUFFIX), profile=False)
            ke.flush(b)
            out[f"store{i}"] = {"cold": cold, "hit": hit(b, p + ke.rand(gen, vocab, ke.SUFFIX), profile=i == 2)}
            print("store", i, "cold", cold["ttft_ms"], "hit", out[f"store{i}"]["hit"]["ttft_ms"],
                  json.dumps(out[f"store{i}"]["hit"]["steps"])[:800], flush=True)
        ke.release(b)
    finish(out, a.json_out)


def finish(out: dict, json_out: str | None) -> None:
    for k in ("host2", "store2"):
        if k not in out:
            continue
        prof = out[k]["hit"].get("prof", {})
        print(k, "cpu", json.dumps(prof.get("cpu"))[:1500])
        print(k, "dev", json.dumps(prof.get("dev"))[:1500])
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1))


main()
