"""Which Python lines launch a decode step's kernels on a GPU (the fused path without CUDA graphs, so that each
kernel has the host call that launched it): kernels per step and their device time, by launching op and the
nearest moeserve frames. The graphs replay the same kernels; this tells where a launch to fuse away comes from
(profile_decode.py gives the kernels' names, not their callers).

    python benchmarks/profile_ops.py --batches 1,64 --json-out ops.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from profile_decode import fill
from torch.profiler import ProfilerActivity, profile


def launches_by_caller(model: str, batch: int, input_len: int, steps: int) -> list[dict]:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    engine = Engine(EngineConfig(model=model, device="cuda", load_format="dummy", skip_tokenizer_init=True,
                                 max_num_seqs=batch, enforce_eager=True, max_model_len=4096))
    try:
        fill(engine, batch, input_len, steps)
        for _ in range(3):
            engine.step()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=True) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
    finally:
        engine.close()
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU or not evt.kernels:
            continue
        frames, parent = [], evt
        while parent is not None and not frames:  # the launching op's stack, else its nearest caller's
            frames = [f.split("moeserve/")[-1] for f in (parent.stack or []) if "moeserve/" in f][:3]
            parent = parent.cpu_parent
        key = f"{evt.name} | {' < '.join(frames)}"
        rows[key][0] += len(evt.kernels)
        rows[key][1] += sum(k.duration for k in evt.kernels)
    return [{"launches_per_step": n / steps, "us_per_step": round(us / steps, 1), "caller": k}
            for k, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][0])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmarks/configs/deepseek_v2_lite")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    out = {}
    for batch in map(int, args.batches.split(",")):
        rows = launches_by_caller(args.model, batch, args.input_len, args.steps)
        out[batch] = rows
        print(f"== batch {batch}: {sum(r['launches_per_step'] for r in rows):.0f} launches a step")
        for r in rows[:40]:
            print(f"{r['launches_per_step']:6.1f} {r['us_per_step']:9.1f} us  {r['caller'][:200]}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
