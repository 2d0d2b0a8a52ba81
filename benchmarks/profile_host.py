"""Host (Python) time of decode steps on the CPU, by phase, with the model's own time taken out.

Builds an engine on a checkpoint (the embedded default model unless ``--model``), fills ``batch`` sequences
with ``--input-len``-token prompts, runs their prefills, then times ``--steps`` decode steps. Each phase of
``EngineStats.phase_s`` is reported in ms per step; ``model`` is the time inside the model's embedding,
layers and LM head (part of "launch" and "sample" on a CPU, where the runner is in the engine's process),
and ``host`` is the step's time less ``model``: what issue 20's "launch" + "process" cost on a GPU host.
``--async-scheduling`` runs the GPU's overlapped step (placeholders, pending rows) on the CPU;
``--cprofile N`` prints the N functions with the most own time over the timed steps.

    python benchmarks/profile_host.py --batches 64,256 --steps 32 [--async-scheduling] [--cprofile 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch


def build_engine(model: str, batch: int, async_scheduling: bool, dtype: str):
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    return Engine(EngineConfig(model=model, device="cpu", dtype=dtype, max_num_seqs=batch,
                               max_num_batched_tokens=max(4096, batch * 64), kv_cache_memory=1 << 30,
                               async_scheduling=async_scheduling, seed=0))


def time_model(engine) -> list[float]:
    """Wrap the model's embedding, layers and LM head with a timer; returns the running total (seconds)."""
    model = engine.executor.runner.model
    total = [0.0]
    for name in ("embed", "forward_layers", "logits"):
        inner = getattr(model, name)

        def timed(*args, _inner=inner, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start
        setattr(model, name, timed)
    return total


def profile_batch(args: argparse.Namespace, batch: int) -> dict:
    from moeserve.coordinator.sampling import SamplingParams

    engine = build_engine(args.model, batch, args.async_scheduling, args.dtype)
    model_s = time_model(engine)
    gen = torch.Generator().manual_seed(1234)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(torch.randint(2, vocab, (batch, args.input_len), generator=gen).tolist()):
        engine.add_request(f"r{i}", prompt_token_ids=ids, params=params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm-up decode steps
        engine.step()
    phases0, model0 = dict(engine.stats.phase_s), model_s[0]
    prof = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if prof is not None:
        prof.enable()
    for _ in range(args.steps):
        engine.step()
    if prof is not None:
        prof.disable()
    step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    phases = {k: (v - phases0[k]) * 1e3 / args.steps for k, v in engine.stats.phase_s.items()}
    model_ms = (model_s[0] - model0) * 1e3 / args.steps
    result = {"batch": batch, "step_ms": step_ms, "model_ms": model_ms, "host_ms": step_ms - model_ms,
              "phases_ms": {k: round(v, 3) for k, v in phases.items() if v}}
    engine.close()
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print(out.getvalue())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--cprofile", type=int, default=0, metavar="N")
    p.add_argument("--json-out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        r = profile_batch(args, batch)
        results.append(r)
        phases = "  ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items())
        print(f"batch {batch:4d}: step {r['step_ms']:.2f} ms, model {r['model_ms']:.2f}, host {r['host_ms']:.2f} "
              f"| {phases}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
