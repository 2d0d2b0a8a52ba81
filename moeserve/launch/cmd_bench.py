"""``moeserve bench``: offline throughput and latency of the engine on random prompts."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from moeserve.launch.engine_args import engine_config

NEEDS_ENGINE_ARGS = True


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="offline benchmark: throughput, TTFT, inter-token latency, memory")
    p.add_argument("--num-prompts", type=int, default=64, help="random prompts, all submitted at once")
    p.add_argument("--input-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt (EOS ignored)")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens every prompt starts with (before its --input-len random ones): prefix reuse")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --speculative-config: runs of each mode, alternated (without, with, without, ...); "
                        "the medians are compared")
    p.add_argument("--json-out", type=Path, default=None,
                   help="also write the results to this JSON file (default: print only)")
    return p


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hit_counts(engine) -> dict[str, int]:
    """Prompt tokens looked up, and found per tier, so far."""
    kv = engine.kv
    snap = kv.connector.snapshot() if kv.connector is not None else {}
    return {"query": kv.num_prefix_query_tokens, "device": kv.num_prefix_hit_tokens,
            "host": int(snap.get("host_hit_tokens", 0)), "store": int(snap.get("store_hit_tokens", 0))}


def hit_rates(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Fraction of the prompt tokens looked up during the run that each tier served."""
    queried = max(1, after["query"] - before["query"])
    return {tier: (after[tier] - before[tier]) / queried for tier in ("device", "host", "store")}


def run_benchmark(engine, num_prompts: int, input_len: int, output_len: int, progress: bool = True,
                  shared_prefix_len: int = 0) -> dict:
    """Submit all prompts at once (random token ids, fixed seed) and run them to completion."""
    import torch
    from tqdm import tqdm

    from moeserve.coordinator.sampling import SamplingParams

    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.stats.phase_s = dict.fromkeys(engine.stats.phase_s, 0.0)
    engine.executor.stage_stats(reset=True)  # stage workers' busy time from here on (none in one process)
    prefix = torch.randint(0, vocab, (shared_prefix_len,), generator=gen).tolist()
    hits_before = hit_counts(engine)
    start = time.perf_counter()
    for i in range(num_prompts):
        ids = prefix + torch.randint(0, vocab, (input_len,), generator=gen).tolist()
        engine.add_request(f"bench-{i}", prompt_token_ids=ids, params=params)
    steps_before = len(engine.stats.step_times)
    ttft: list[float] = []
    itl: list[float] = []
    last: dict[str, float] = {}
    bar = tqdm(total=num_prompts * output_len, desc="bench", unit="tok", disable=not progress)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id not in last:
                ttft.append(now - start)
            else:
                itl.append(now - last[out.request_id])
            last[out.request_id] = now
        bar.update(sum(len(out.new_token_ids) for out in outs))
    bar.close()
    elapsed = time.perf_counter() - start
    out_tokens = num_prompts * output_len
    result = {
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": num_prompts * (input_len + output_len) / elapsed,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "peak_memory_bytes": peak_memory_bytes(engine.config.torch_device),
        "num_preemptions": engine.stats.num_preemptions,
        "max_batches_in_flight": engine.stats.max_in_flight,
        "engine_phase_fraction": {k: v / elapsed for k, v in engine.stats.phase_s.items()},
        "prefix_hit_rate": hit_rates(hits_before, hit_counts(engine)),
        "step_ms_p50": percentile(engine.stats.step_times[steps_before:], 50) * 1e3,  # decode steps, mostly
    }
    if engine.speculator is not None:
        stats = engine.stats
        result["spec_decode"] = {"draft_tokens": stats.num_draft_tokens, "accepted_tokens": stats.num_accepted_tokens,
                                 "mean_acceptance_length": stats.mean_acceptance_length,
                                 "draft_ms_per_step": engine.stats.phase_s["draft"] / max(1, stats.num_steps) * 1e3}
    stage_stats = engine.executor.stage_stats()
    if stage_stats:
        result["stage_busy"] = stage_busy(engine, stage_stats, elapsed)
    return result


def stage_busy(engine, stats, elapsed: float) -> list[dict]:
    """Per pipeline stage: the fraction of the benchmark's wall time its ranks spent computing (mean over the
    stage's tp ranks), and the steps it ran. With several batches in flight the stages overlap, so the
    fractions can add up to more than 1."""
    dims = engine.config.parallel_dims
    rows = []
    for stage in range(dims.pp):
        ranks = dims.stage_ranks(0, stage)
        busy = [s.busy_s for s in stats if s.rank in ranks]
        rows.append({"stage": stage, "ranks": list(ranks), "steps": stats[ranks[0]].steps,
                     "busy_fraction": sum(busy) / len(busy) / elapsed})
    return rows


def print_table(result: dict) -> None:
    rows = [("output tokens/s", f"{result['output_tokens_per_s']:.1f}"),
            ("total tokens/s", f"{result['total_tokens_per_s']:.1f}"),
            ("TTFT p50 / p99", f"{result['ttft_p50_s'] * 1e3:.1f} / {result['ttft_p99_s'] * 1e3:.1f} ms"),
            ("ITL p50 / p99", f"{result['itl_p50_s'] * 1e3:.1f} / {result['itl_p99_s'] * 1e3:.1f} ms"),
            ("peak memory", f"{result['peak_memory_bytes'] / 2**20:.0f} MiB"),
            ("preemptions", str(result["num_preemptions"]))]
    phases = ", ".join(f"{k} {v * 100:.0f}%" for k, v in result["engine_phase_fraction"].items())
    rows.append(("engine time", phases))
    rows.append(("step p50", f"{result['step_ms_p50']:.2f} ms"))
    spec = result.get("spec_decode")
    if spec is not None:
        rows.append(("spec decode", f"mean acceptance length {spec['mean_acceptance_length']:.2f} "
                                    f"({spec['accepted_tokens']} of {spec['draft_tokens']} drafts accepted), "
                                    f"draft {spec['draft_ms_per_step']:.2f} ms/step"))
    rates = result["prefix_hit_rate"]
    rows.append(("prefix hits", ", ".join(f"{tier} {rate * 100:.1f}%" for tier, rate in rates.items())
                 + " of prompt tokens"))
    for row in result.get("stage_busy", []):
        rows.append((f"stage {row['stage']} busy", f"{row['busy_fraction'] * 100:.0f}% ({row['steps']} steps)"))
    for key, value in rows:
        print(f"{key:<18} {value}")


def run(args: argparse.Namespace) -> int:
    from moeserve.coordinator.engine import Engine
    from moeserve.launch.preflight import check_engine

    config = engine_config(args)
    check_engine(config)
    if config.speculative_config is not None:
        from moeserve.launch.bench_spec import compare_speculative

        return compare_speculative(config, args)
    engine = Engine(config)
    try:
        result = run_benchmark(engine, args.num_prompts, args.input_len, args.output_len,
                               shared_prefix_len=args.shared_prefix_len)
    finally:
        engine.close()
    result["model"] = str(engine.config.model_path)
    result["device"] = engine.config.device
    print_table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0
