"""Profile of one prefill step and one decode step on CPU, by op and by oneDNN kernel.

The engine runs bench_cpu.py's DeepSeek-V2-shaped bf16 checkpoint (written if missing): ``--prompts`` prompts
of ``--input-len`` tokens are prefilled in one step (4,096 tokens by default, bench_cpu's chunk), then the
batch decodes. After a warm-up of each, one prefill step and ``--decode-steps`` decode steps run under the
torch profiler (self CPU time per op and input shapes), and again with oneDNN's verbose mode on, whose lines
name the kernel each matmul took (``brg_matmul:avx10_1_512_amx`` / ``brg:avx512_core_amx`` are AMX tiles;
``avx512_core_bf16`` / ``gemm:jit`` are not) and its time.

    python benchmarks/profile_cpu.py [--threads 2] [--prompts 32] [--input-len 128] [--json-out p.json]

Times are wall times of this process; on a shared machine compare proportions, not totals. "inside ops" is
the profiler's self time of every op in a step: the step's time less that is the Python and bookkeeping
around the ops (one thread, however many cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cpu import V2_SHAPED, write_checkpoint  # noqa: E402

MARK = "@@phase "


def build_engine(model: Path, batch: int, chunk: int):
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    return Engine(EngineConfig(model=str(model), dtype="bfloat16", max_num_seqs=batch,
                               max_num_batched_tokens=chunk, kv_cache_memory=1 << 30))


def fill(engine, prompts: int, input_len: int, tag: str) -> None:
    from moeserve.coordinator.sampling import SamplingParams

    gen = torch.Generator().manual_seed(len(tag))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(prompts):
        ids = torch.randint(2, V2_SHAPED["vocab_size"], (input_len,), generator=gen).tolist()
        engine.add_request(f"{tag}-{i}", prompt_token_ids=ids, params=params)


def run_phases(engine, args: argparse.Namespace, around) -> dict[str, float]:
    """Warm up, then one prefill step and ``decode_steps`` decode steps, each inside ``around(phase)``;
    returns the wall seconds of each phase."""
    fill(engine, args.prompts, args.input_len, "warm")
    while engine.has_unfinished():  # warm-up: the same prefill and decode shapes once
        engine.step()
    fill(engine, args.prompts, args.input_len, "measured")
    seconds = {}
    with around("prefill"):
        t = time.perf_counter()
        engine.step()
        seconds["prefill"] = time.perf_counter() - t
    engine.step()  # the first decode step after a prefill
    with around("decode"):
        t = time.perf_counter()
        for _ in range(args.decode_steps):
            engine.step()
        seconds["decode"] = (time.perf_counter() - t) / args.decode_steps
    return seconds


def child(args: argparse.Namespace) -> None:
    """Runs in a subprocess (oneDNN reads its verbose switch at start)."""
    from contextlib import contextmanager

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    engine = build_engine(args.model, args.prompts, args.prompts * args.input_len)
    tables: dict[str, list] = {}
    totals: dict[str, dict[str, float]] = {}

    @contextmanager
    def profiled(phase: str):
        if args.verbose:
            print(MARK + phase, flush=True)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                yield
            print(MARK + "end", flush=True)
            return
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            yield
        rows = [(e.key, str(e.input_shapes)[:120], e.count, e.self_cpu_time_total / 1e3)
                for e in prof.key_averages(group_by_input_shape=True)]
        tables[phase] = sorted(rows, key=lambda r: -r[3])[:args.top]
        steps = args.decode_steps if phase == "decode" else 1
        totals[phase] = {"op_calls_per_step": sum(r[2] for r in rows) / steps,
                         "op_self_ms_per_step": sum(r[3] for r in rows) / steps}

    seconds = run_phases(engine, args, profiled)
    print(json.dumps({"seconds": seconds, "ops": tables, "totals": totals}), flush=True)


KERNEL = re.compile(r"onednn_verbose,(?:v1,)?primitive,exec,cpu,(\w+),([^,]+),[^,]*,([^,]*),[^,]*,[^,]*,([^,]*),"
                    r"([\d.]+)")


def parse_verbose(text: str) -> dict[str, list[dict]]:
    """oneDNN verbose lines between phase marks -> per phase, per (primitive, kernel, shape): calls and ms."""
    phase, acc = None, defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for line in text.splitlines():
        if line.startswith(MARK):
            phase = line[len(MARK):].strip()
            phase = None if phase == "end" else phase
            continue
        m = KERNEL.match(line)
        if phase and m:
            prim, impl, _mds, shape, ms = m.groups()
            entry = acc[phase][(prim, impl, shape)]
            entry[0] += 1
            entry[1] += float(ms)
    return {ph: sorted(({"primitive": k[0], "kernel": k[1], "shape": k[2], "calls": v[0], "ms": round(v[1], 3)}
                        for k, v in rows.items()), key=lambda r: -r["ms"]) for ph, rows in acc.items()}


def amx_share(kernels: list[dict]) -> float:
    total = sum(k["ms"] for k in kernels)
    return sum(k["ms"] for k in kernels if "amx" in k["kernel"]) / total if total else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/moeserve-bench-v2"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    write_checkpoint(args.model)
    base = [sys.executable, __file__, "--child", "--model", str(args.model), "--threads", str(args.threads),
            "--prompts", str(args.prompts), "--input-len", str(args.input_len),
            "--decode-steps", str(args.decode_steps), "--top", str(args.top)]
    ops = subprocess.run(base, capture_output=True, text=True, check=True)
    verbose = subprocess.run(base + ["--verbose"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, ONEDNN_VERBOSE="0"))
    result = json.loads(ops.stdout.strip().splitlines()[-1])
    kernels = parse_verbose(verbose.stdout)
    result["onednn"] = kernels
    result["amx_share_of_onednn_ms"] = {ph: round(amx_share(k), 3) for ph, k in kernels.items()}
    for phase in ("prefill", "decode"):
        tot = result["totals"][phase]
        print(f"== {phase}: {result['seconds'][phase] * 1e3:.1f} ms per step under the profiler, "
              f"{tot['op_self_ms_per_step']:.1f} ms of it inside {tot['op_calls_per_step']:.0f} op calls; "
              f"oneDNN time on AMX kernels: {result['amx_share_of_onednn_ms'].get(phase, 0):.0%}")
        for k in kernels.get(phase, [])[:12]:
            print(f"   {k['ms']:9.2f} ms {k['calls']:5d}x  {k['primitive']:<13} {k['kernel']:<28} {k['shape']}")
        print("   -- ops by self CPU time (ms):")
        for name, shapes, count, ms in result["ops"][phase][:args.top]:
            print(f"   {ms:9.2f} ms {count:5d}x  {name:<34} {shapes}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
