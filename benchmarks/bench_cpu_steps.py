"""Prefill and decode step times of the engine on CPU, in CPU time of this process as well as wall time.

bench_cpu.py's DeepSeek-V2-shaped bf16 checkpoint (written if missing); each round queues ``--prompts``
prompts of ``--input-len`` tokens, times the step that prefills them and ``--decode-steps`` decode steps,
then drains. CPU time (``time.process_time``) is much less disturbed than wall time when other jobs share
the machine; with ``--threads 1`` it is the work itself. Point PYTHONPATH at another checkout for its figures.

    python benchmarks/bench_cpu_steps.py [--threads 1] [--prompts 32] [--input-len 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import V2_SHAPED, write_checkpoint  # noqa: E402


def main() -> None:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/moeserve-bench-v2"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="max_num_seqs")
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=str(write_checkpoint(args.model)), dtype="bfloat16", max_num_seqs=args.batch,
                                 max_num_batched_tokens=args.prompts * args.input_len, kv_cache_memory=1 << 30))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.decode_steps + 4, temperature=0.0, ignore_eos=True)
    times: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}

    def timed(phase: str) -> None:
        c, w = time.process_time(), time.perf_counter()
        engine.step()
        times[phase].append((time.process_time() - c, time.perf_counter() - w))

    for r in range(args.rounds):
        for i in range(args.prompts):
            ids = torch.randint(2, V2_SHAPED["vocab_size"], (args.input_len,), generator=gen).tolist()
            engine.add_request(f"{r}-{i}", prompt_token_ids=ids, params=params)
        timed("prefill")
        engine.step()  # the first decode step after a prefill
        for _ in range(args.decode_steps):
            timed("decode")
        while engine.has_unfinished():
            engine.step()
    # the minimum is the work itself; the median and the maximum show how much a step waits beyond it
    print(json.dumps({phase: {"cpu_ms_min": round(1e3 * min(c for c, _ in t), 1),
                              "wall_ms_min": round(1e3 * min(w for _, w in t), 1),
                              "wall_ms_median": round(1e3 * statistics.median(w for _, w in t), 1),
                              "wall_ms_max": round(1e3 * max(w for _, w in t), 1), "steps": len(t)}
                      for phase, t in times.items()} | {"threads": args.threads}))


if __name__ == "__main__":
    main()
