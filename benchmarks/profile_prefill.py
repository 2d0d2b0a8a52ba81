"""Profile of one prefill step on a GPU: wall time, GPU busy time and the top kernels.

Builds the engine on dummy weights (DeepSeek-V2-Lite by default), runs one step of ``--prompts`` prompts of
``--input-len`` tokens to warm up, then times and profiles another such step (the torch profiler).

    python benchmarks/profile_prefill.py --model benchmarks/configs/deepseek_v3_6l --prompts 8 --input-len 1024
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile


def step_of(engine, prompts: int, input_len: int, seed: int) -> float:
    """Queue ``prompts`` prompts and run the one step that prefills them -> seconds (synchronised)."""
    from moeserve.coordinator.sampling import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(prompts):
        ids = torch.randint(0, engine.model_config.vocab_size, (input_len,), generator=gen).tolist()
        engine.add_request(f"s{seed}-{i}", prompt_token_ids=ids, params=params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/configs/deepseek_v2_lite")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=1024)
    args = p.parse_args()
    engine = Engine(EngineConfig(model=args.model, device="cuda", load_format="dummy", skip_tokenizer_init=True,
                                 max_num_batched_tokens=args.prompts * args.input_len))
    step_of(engine, args.prompts, args.input_len, 0)
    wall = step_of(engine, args.prompts, args.input_len, 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_of(engine, args.prompts, args.input_len, 2)
    ms: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            ms[evt.name[:80]] += evt.device_time / 1e3
            launches[evt.name[:80]] += 1
    tokens = args.prompts * args.input_len
    print(json.dumps({"model": args.model, "tokens": tokens, "wall_ms": round(wall * 1e3, 1),
                      "prompt_tok_s": round(tokens / wall), "gpu_busy_ms": round(sum(ms.values()), 1),
                      "fast_path_error": engine.executor.runner.fast_path_error}))
    for name in sorted(ms, key=ms.__getitem__, reverse=True)[:12]:
        print(f"{ms[name]:8.2f} ms {launches[name]:5d}x  {name}")


if __name__ == "__main__":
    main()
