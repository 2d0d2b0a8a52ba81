"""Host (Python) time of decode steps on the CPU, by phase, with the model's own time taken out.

Builds an engine on a checkpoint (the embedded default model unless ``--model``), fills ``batch`` sequences
with ``--input-len``-token prompts, runs their prefills, then times ``--steps`` decode steps. Each phase of
``EngineStats.phase_s`` is reported in ms per step; ``model`` is the time inside the model's embedding,
layers and LM head (part of "launch" and "sample" on a CPU, where the runner is in the engine's process),
and ``host`` is the step's time less ``model``: what issue 20's "launch" + "process" cost on a GPU host.
``--async-scheduling`` runs the GPU's overlapped step (placeholders, pending rows) on the CPU;
``--cprofile N`` profiles as many steps again and prints the N functions with the most own time. Unlike
``bench_engine_overhead.py`` (a trivial dummy model, no tokenizer) the runner's own host work (metadata,
input tensors) and detokenization count. With ``--device cuda`` the model runs asynchronously: ``model``
is then about 0 and the phases are the host's own time (issue 20).

    python benchmarks/profile_host.py --batches 64,256 --steps 32 [--async-scheduling] [--cprofile 25]
    python benchmarks/profile_host.py --device cuda --dtype bfloat16 --model benchmarks/configs/deepseek_v2_lite \
        --load-format dummy --skip-tokenizer-init --max-model-len 4096 --input-len 1024 --batches 256
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch


def build_engine(args: argparse.Namespace, batch: int):
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    cuda = args.device == "cuda"
    return Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=batch,
                               max_num_batched_tokens=max(4096, batch * 64),
                               kv_cache_memory=0 if cuda else 1 << 30, load_format=args.load_format,
                               skip_tokenizer_init=args.skip_tokenizer_init, max_model_len=args.max_model_len,
                               async_scheduling=args.async_scheduling, seed=0))


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

    engine = build_engine(args, batch)
    model_s = time_model(engine)
    gen = torch.Generator().manual_seed(1234)
    vocab = engine.model_config.vocab_size
    # as many tokens as the context allows: the first prompts decode while the last ones prefill, so a budget
    # counted from the timed steps alone can finish them inside the window and shrink the batch
    params = SamplingParams(max_tokens=engine.max_model_len - args.input_len, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(torch.randint(2, vocab, (batch, args.input_len), generator=gen).tolist()):
        engine.add_request(f"r{i}", prompt_token_ids=ids, params=params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm-up decode steps
        engine.step()
    phases0, model0 = dict(engine.stats.phase_s), model_s[0]
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    assert len(engine.scheduler.running) == batch, "the batch shrank inside the timed window"
    phases = {k: (v - phases0[k]) * 1e3 / args.steps for k, v in engine.stats.phase_s.items()}
    model_ms = (model_s[0] - model0) * 1e3 / args.steps
    result = {"batch": batch, "step_ms": step_ms, "model_ms": model_ms, "host_ms": step_ms - model_ms,
              "phases_ms": {k: round(v, 3) for k, v in phases.items() if v}}
    if args.cprofile:  # as many steps again, under the profiler (which slows Python down: not timed)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print(out.getvalue())
    engine.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="the engine's async scheduling (default: on for cuda, off for cpu)")
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
