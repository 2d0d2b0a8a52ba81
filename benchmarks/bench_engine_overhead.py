"""The coordinator's own work per engine step, apart from the model: scheduling and the step plan, the
sampling batch and the sampler, output processing -- what stays on the host once CUDA graphs take the
launches away.

The model is made trivial (dummy weights of a 2-layer, width-128 DeepSeek-V2 shape with a 512-token
vocabulary, on the CPU), so that what is timed is the engine around it. Each batch decodes ``--output-len``
tokens after a 128-token prompt. Host work = every phase of ``EngineStats.phase_s`` but "launch" (the
runner's submit, which runs the model on a CPU); ``--async-scheduling`` runs the engine's overlapped step
(on a CPU nothing overlaps: the same work in another order).

    python benchmarks/bench_engine_overhead.py --batches 64,256 [--async-scheduling]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def measure(model_dir: str, batch: int, output_len: int, async_scheduling: bool = False) -> dict:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    engine = Engine(EngineConfig(model=model_dir, load_format="dummy", skip_tokenizer_init=True,
                                 max_num_seqs=batch, kv_cache_memory=1 << 30, block_size=64,
                                 max_num_batched_tokens=batch * 128, async_scheduling=async_scheduling))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", prompt_token_ids=torch.randint(2, 512, (128,), generator=gen).tolist(),
                           params=params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    stats = engine.stats
    stats.phase_s = dict.fromkeys(stats.phase_s, 0.0)
    first = stats.num_steps
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    steps = stats.num_steps - first
    per_step = {k: v / steps * 1e3 for k, v in stats.phase_s.items()}
    host = sum(v for k, v in per_step.items() if k != "launch")
    wall_ms, cpu_ms = (time.perf_counter() - wall0) / steps * 1e3, (time.process_time() - cpu0) / steps * 1e3
    engine.close()
    return {"batch": batch, "async_scheduling": async_scheduling, "steps": steps,
            "wall_ms_per_step": wall_ms, "cpu_ms_per_step": cpu_ms,
            "model_ms_per_step": per_step["launch"], "host_ms_per_step": host,
            "host_us_per_sequence": host / batch * 1e3,
            "phase_ms_per_step": {k: round(v, 3) for k, v in per_step.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="64,256")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--async-scheduling", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        from moeserve.model.synthetic import tiny_config

        config = tiny_config(vocab_size=512, num_hidden_layers=2, max_position_embeddings=4096)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        for batch in [int(b) for b in args.batches.split(",")]:
            print(json.dumps(measure(tmp, batch, args.output_len, args.async_scheduling)), flush=True)


if __name__ == "__main__":
    main()
