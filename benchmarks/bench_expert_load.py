"""Expert-load benchmarks.

``counters``: what counting routed tokens costs. The same engine (one process, the V2-shaped checkpoint of
bench_cpu.py) decodes a batch with its MoE layers' counters attached and detached on alternate steps; the
median decode step times are compared, and one counting call is timed on its own:

    python benchmarks/bench_expert_load.py counters --num-prompts 32 --output-len 64 --repeats 5

``scrape``: how long one /metrics scrape takes with DeepSeek-V3's 58 MoE layers, 256 experts and 64 EP ranks
(synthetic counts; the collector and prometheus-client's text encoder, as the server runs them):

    python benchmarks/bench_expert_load.py scrape --layers 58 --experts 256 --ranks 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class AlternatingRunner:
    """Wraps the engine's runner: every decode step alternates counters on / off and is timed, so that the
    two modes share the machine's ups and downs (this machine is shared and noisy)."""

    def __init__(self, runner, moe_layers: list) -> None:
        self.runner, self.moe_layers, self.counter = runner, moe_layers, runner.expert_load
        self.times: dict[str, list[float]] = {"on": [], "off": []}
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, plan, prev_token_ids=None):
        mode = "on" if self.calls % 2 else "off"
        self.calls += 1
        for moe in self.moe_layers:
            moe.load_counter = self.counter if mode == "on" else None
        start = time.perf_counter()
        out = self.runner.execute(plan, prev_token_ids)
        if out.device.type == "cuda":  # the submit only queues the step's kernels: time them run
            torch.cuda.synchronize(out.device)
        if all(q == 1 for q in plan.query_lens):  # decode steps only
            self.times[mode].append(time.perf_counter() - start)
        return out


def count_call_seconds(counter, num_tokens: int, top_k: int, num_experts: int, repeats: int = 2000) -> float:
    """Median seconds of one ``count_routed`` call (one MoE layer) on [num_tokens, top_k] ids."""
    from moeserve.experts.load_counter import count_routed

    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=counter.device)
    layer = counter.layer_ids[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        count_routed(counter, layer, ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_counters(args: argparse.Namespace) -> dict:
    from bench_cpu import V2_SHAPED, prompts, write_checkpoint

    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    model = write_checkpoint(Path(args.checkpoint or tempfile.mkdtemp(prefix="moeserve-v2shaped-")))
    ids = prompts(args.num_prompts, args.input_len, V2_SHAPED["vocab_size"])
    # NOTE: eager steps: attaching and detaching the counters per step cannot change a captured CUDA graph
    engine = Engine(EngineConfig(model=str(model), dtype=args.dtype, device=args.device, max_num_seqs=len(ids),
                                 max_num_batched_tokens=len(ids) * args.input_len, skip_tokenizer_init=True,
                                 enforce_eager=True, async_scheduling=False))
    moe_layers = list(engine.executor.runner.model.moe_layers().values())
    runner = AlternatingRunner(engine.executor.runner, moe_layers)
    engine.executor.runner = runner  # type: ignore[assignment]  (the in-process executor runs its steps)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for _ in range(args.repeats):
        engine.generate(ids, params)
    on, off = statistics.median(runner.times["on"]), statistics.median(runner.times["off"])
    per_call = count_call_seconds(runner.counter, len(ids), V2_SHAPED["num_experts_per_tok"],
                                  V2_SHAPED["n_routed_experts"])
    return {"bench": "counters", "decode_steps": {k: len(v) for k, v in runner.times.items()},
            "median_step_ms_on": 1e3 * on, "median_step_ms_off": 1e3 * off, "cost_pct": 100 * (on - off) / off,
            "count_call_us": 1e6 * per_call, "count_calls_per_step": len(moe_layers),
            "count_share_of_step_pct": 100 * per_call * len(moe_layers) / off,
            "counted_pairs": int(runner.counter.logical.sum()), "config": vars(args)}


def bench_scrape(args: argparse.Namespace) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    from moeserve.coordinator.expert_load import LoadAggregator
    from moeserve.frontend.load_metrics import ExpertLoadCollector

    slots = args.experts // args.ranks + args.redundant
    gen = torch.Generator().manual_seed(0)
    phy2log = torch.cat([torch.randperm(args.experts, generator=gen),
                         torch.randint(0, args.experts, (args.ranks * slots - args.experts,), generator=gen)])
    agg = LoadAggregator(tuple(range(3, 3 + args.layers)), args.experts, phy2log.view(args.ranks, slots))
    for rank in range(args.ranks):  # every rank reports its share of every layer
        logical = torch.randint(0, 1000, (args.layers, 2, args.experts), generator=gen)
        physical = torch.randint(0, 1000, (args.layers, 2, args.ranks * slots), generator=gen)
        agg.update(rank, agg.layer_ids, logical, physical)
    agg.close_window(100)
    registry = CollectorRegistry()
    collector = ExpertLoadCollector(lambda: [agg.view], top_k=args.top_k)
    registry.register(collector)  # type: ignore[arg-type]
    times, size = [], 0
    for i in range(args.repeats):  # what ServerMetrics.render does, each time on a new window (no cache)
        agg.close_window(100 + i)
        start = time.perf_counter()
        size = len(generate_latest(registry) + collector.text())
        times.append(time.perf_counter() - start)
    return {"bench": "scrape", "seconds": times, "median_ms": 1e3 * statistics.median(times),
            "max_ms": 1e3 * max(times), "bytes": size, "config": vars(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    c = sub.add_parser("counters")
    c.add_argument("--num-prompts", type=int, default=32)
    c.add_argument("--input-len", type=int, default=16)
    c.add_argument("--output-len", type=int, default=64)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--device", default="cpu")
    c.add_argument("--checkpoint", default="", help="where the V2-shaped checkpoint is (or is written)")
    s = sub.add_parser("scrape")
    s.add_argument("--layers", type=int, default=58)
    s.add_argument("--experts", type=int, default=256)
    s.add_argument("--ranks", type=int, default=64)
    s.add_argument("--redundant", type=int, default=1, help="extra slots per rank")
    s.add_argument("--top-k", type=int, default=4, help="hottest and coldest experts per layer exported")
    s.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    result = bench_counters(args) if args.bench == "counters" else bench_scrape(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
