"""Issue 21: which decode steps are slow with store writes on, and is it host or device time.

Run from the repository root on a GPU host with redis-server on PATH (nineteenth session, run 4):
``python probe_itl_steps.py --json-out itl_probe.json``. ``moeserve bench``'s ITL workload (32 prompts of 512
tokens, 256 out, V2-Lite dummy), store writes off then on; per step its host time, its CUDA-event time and its
phases, each save's host time, and the torch profiler over steps 63-65 and 100.
"""

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
import kvstore_engines as ke  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from moeserve.coordinator.sampling import SamplingParams  # noqa: E402
from moeserve.kvstore import mover  # noqa: E402

SAVE_MS: list[tuple[int, float]] = []  # (step, host ms) of each save
STEP = [0]
_save = mover.BlockMover.save


def timed_save(*a, **k):
    t = time.perf_counter()
    _save(*a, **k)
    SAVE_MS.append((STEP[0], round((time.perf_counter() - t) * 1e3, 2)))


mover.BlockMover.save = timed_save


def profile_summary(p) -> dict:
    ka = p.key_averages()
    by_cpu = sorted(ka, key=lambda k: -k.self_cpu_time_total)[:12]
    by_dev = sorted(ka, key=lambda k: -getattr(k, "self_device_time_total", 0))[:10]
    return {"cpu": [(k.key[:60], round(k.self_cpu_time_total / 1e3, 3), k.count) for k in by_cpu],
            "dev": [(k.key[:60], round(getattr(k, "self_device_time_total", 0) / 1e3, 3), k.count) for k in by_dev]}


def run(e, n=32, inp=512, outl=256, seed=0, prof_steps=()) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=outl, temperature=0.0, ignore_eos=True)
    for i in range(n):
        prompt = torch.randint(0, e.model_config.vocab_size, (inp,), generator=gen).tolist()
        e.add_request(f"b{seed}_{i}", prompt_token_ids=prompt, params=params)
    SAVE_MS.clear()
    steps, device, phases, profiles = [], [], [], {}
    i = 0
    while e.has_unfinished():
        STEP[0] = i
        before = dict(e.stats.phase_s)
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        p = None
        if i in prof_steps:
            p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                   torch.profiler.ProfilerActivity.CUDA])
            p.__enter__()
        t0 = time.perf_counter()
        ev0.record()
        e.step()
        ev1.record()
        t1 = time.perf_counter()
        if p is not None:
            torch.cuda.synchronize()
            p.__exit__(None, None, None)
            profiles[i] = profile_summary(p)
        steps.append(round((t1 - t0) * 1e3, 2))
        ev1.synchronize()
        device.append(round(ev0.elapsed_time(ev1), 2))
        phases.append({k: round((v - before.get(k, 0)) * 1e3, 2) for k, v in e.stats.phase_s.items()
                       if v - before.get(k, 0) > 2e-4})
        i += 1
    med = statistics.median(steps)
    slow = [j for j, s in enumerate(steps) if j > 3 and s > 1.2 * med]
    last = min(100, len(steps) - 1)
    return {"step_p50": med, "gpu_p50": statistics.median(device), "n_slow": len(slow),
            "slow": [(j, steps[j], device[j], phases[j]) for j in slow[:14]],
            "typical": (last, steps[last], device[last], phases[last]),
            "saves": [s for s in SAVE_MS if s[1] > 0.5][:30], "prof": profiles}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out")
    a = ap.parse_args()
    args = argparse.Namespace(model="benchmarks/configs/deepseek_v2_lite", device="cuda", dtype="auto",
                              load_format="dummy", max_num_batched_tokens=8192, block_size=0, max_model_len=0,
                              kv_layerwise=False, store_connections=4)
    out = {}
    with RedisServer(Path(tempfile.mkdtemp())) as server:
        server.cli("config", "set", "maxmemory", "0")
        for v in ("off", "on"):
            kw = {"kv_store": server.url, "kv_store_salt": v} if v == "on" else {}
            e = ke.make(args, **kw)
            run(e, n=8, outl=16, seed=1)  # warm-up
            out[v] = r = run(e, prof_steps=(63, 64, 65, 100))
            ke.release(e)
            del e
            print(v, json.dumps({k: r[k] for k in r if k != "prof"})[:3000], flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))


main()
