"""``moeserve bench --speculative-config``: the same workload without and with speculative decoding, in
alternating rounds of one run (one engine at a time, closed between rounds, so that a GPU holds one copy of
the weights), and the ratio of their decode speeds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics


def compare_speculative(config, args: argparse.Namespace) -> int:
    from moeserve.coordinator.engine import Engine
    from moeserve.launch.cmd_bench import print_table, run_benchmark

    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(max(1, args.rounds)):
        for mode in ("without", "with"):
            cfg = config if mode == "with" else dataclasses.replace(config, speculative_config=None)
            engine = Engine(cfg)
            try:
                runs[mode].append(run_benchmark(engine, args.num_prompts, args.input_len, args.output_len,
                                                progress=False, shared_prefix_len=args.shared_prefix_len))
            finally:
                engine.close()
    summary = summarize(runs, config)
    for mode in ("without", "with"):
        print(f"--- {mode} speculative decoding (last round) ---")
        print_table(runs[mode][-1])
    print(f"--- speculative decoding ({config.speculative_config.to_json()}) ---")
    for key, value in summary.items():
        print(f"{key:<28} {value:.3f}" if isinstance(value, float) else f"{key:<28} {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


def summarize(runs: dict[str, list[dict]], config) -> dict:
    """Medians over the rounds: output tokens/s of each mode, their ratio, the step times, and the
    acceptance figures of the speculative runs."""
    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    spec = [r["spec_decode"] for r in runs["with"]]
    out = {
        "rounds": len(runs["with"]),
        "output_tokens_per_s_without": median("without", "output_tokens_per_s"),
        "output_tokens_per_s_with": median("with", "output_tokens_per_s"),
        "step_ms_p50_without": median("without", "step_ms_p50"),
        "step_ms_p50_with": median("with", "step_ms_p50"),
        "draft_ms_per_step": statistics.median(s["draft_ms_per_step"] for s in spec),
        "mean_acceptance_length": statistics.median(s["mean_acceptance_length"] for s in spec),
        "draft_tokens": sum(s["draft_tokens"] for s in spec),
        "accepted_tokens": sum(s["accepted_tokens"] for s in spec),
    }
    out["speedup"] = out["output_tokens_per_s_with"] / out["output_tokens_per_s_without"]
    return out
