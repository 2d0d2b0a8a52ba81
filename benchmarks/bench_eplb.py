"""Online expert rebalancing where it should pay: ranks in parallel on their own cores, experts a realistic
share of a step, a skewed router -- predicted and measured decode gain side by side, and an already-even
load where nothing may move.

The benchmark writes a DeepSeek-V3-shaped checkpoint (sigmoid router with noaux_tc, random weights) with
the dims of the flags. By default they give a DeepSeek-V2-Lite-like ratio of routed-expert to attention
work per token (V2-Lite: top-6 experts of 2048 x 1408 against MLA's projections, about 3.7 to 1; here top-4
of 512 x 512 against MLA at hidden 512, about 3.6 to 1), with the batch large enough that each active
expert runs tens of rows (its time grows with its rows, which is what balancing evens out). The router bias
``e_score_correction_bias`` makes a few experts, all first held by EP rank 0, win most picks.

Each rank (stage worker) is pinned to its own disjoint set of cores (every thread of it, by
``os.sched_setaffinity``) with as many torch threads; the coordinator (this process) takes the cores left
over, or shares them when none are. Phases, each the same batch of greedy requests:

  first      the starting placement (online rebalancing checks off): the counts the prediction uses;
  rebalance  checks every ``--eplb-interval`` steps, until a round moves nothing;
  settled    the checks still on (a move here would be thrash: there must be none);
  paired     checks off, ``--repeats`` pairs: the start placement and the rebalanced one, in alternating order
             (AB, BA, ...), each reached by the rebalancer's real chunked point-to-point moves (so drift on a
             busy machine, and any effect of the order, hit both alike).

Then the same on a uniform router (``even``): with checks on nothing may move (so throughput cannot drop).

Predicted gain: from the static phase's measured counts, the planner's placement and a timing of the
routed experts on one rank's cores (the heaviest rank's rows per decode step, through the real
``MoE.experts_loop``): ``T_static / (T_static - (E_heaviest_static - E_heaviest_planned)) - 1``; with it
the heaviest rank's wasted share (``1 - balancedness``) and the experts' share of the step. Measured gain:
decode tok/s after / static - 1.

    python benchmarks/bench_eplb.py --ep 2                      # this 2-core machine: one core per rank
    python benchmarks/bench_eplb.py --ep 4 --cores-per-rank 4   # a 16-core host
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

BASE = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 4096,
    "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8, "n_group": 1, "topk_group": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "kv_lora_rank": 128, "q_lora_rank": None,
    "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1024, "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0,
    "eos_token_id": 1, "torch_dtype": "float32", "hidden_act": "silu", "attention_bias": False,
}
HOT = {0: 1.0, 1: 1.0, 2: 0.6, 3: 0.6}  # expert -> router bias (the others 0): these win most top-k picks


def model_config(args: argparse.Namespace) -> dict:
    return {**BASE, "hidden_size": args.hidden_size, "moe_intermediate_size": args.moe_intermediate_size,
            "n_routed_experts": args.num_experts, "num_experts_per_tok": args.top_k,
            "n_shared_experts": args.shared_experts, "num_hidden_layers": args.layers}


def write_checkpoint(path: Path, raw: dict, skewed: bool) -> Path:
    from safetensors.torch import load_file, save_file

    from moeserve.model.synthetic import write_random_checkpoint

    if (path / "config.json").exists():
        return path
    write_random_checkpoint(raw, path, seed=0, std=0.05)
    for file in path.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            if name.endswith("e_score_correction_bias"):
                bias = torch.zeros_like(tensors[name])
                for e, b in (HOT if skewed else {}).items():
                    bias[e] = b
                tensors[name] = bias
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def write_start_placement(path: Path, num_experts: int, ep: int, redundant: int) -> Path:
    """The placement the engine starts from: contiguous blocks (the hot experts 0-3 all on rank 0, as a
    router trained elsewhere may leave them), each rank's extra slots holding copies of the next rank's last
    (cold) experts."""
    per_rank, extra = num_experts // ep, redundant // ep
    if num_experts % ep or redundant % ep or per_rank < 4 or extra > per_rank:
        raise SystemExit(f"{num_experts} experts and {redundant} redundant slots must split evenly over {ep} "
                         "ranks, at least 4 experts and no more extra slots than experts a rank")
    phy2log = []
    for r in range(ep):
        nxt = (r + 1) % ep
        phy2log.append(list(range(r * per_rank, (r + 1) * per_rank)) +
                       list(range((nxt + 1) * per_rank - extra, (nxt + 1) * per_rank)))
    path.write_text(json.dumps({"phy2log": phy2log}))
    return path


def rank_core_sets(ep: int, cores_per_rank: int) -> list[list[int]]:
    """Disjoint core sets, rank r the r-th run of ``cores_per_rank`` of this process's allowed cores."""
    allowed = sorted(os.sched_getaffinity(0))
    if ep * cores_per_rank > len(allowed):
        raise SystemExit(f"{ep} ranks x {cores_per_rank} cores need {ep * cores_per_rank} cores, "
                         f"this process may use {len(allowed)}")
    return [allowed[r * cores_per_rank:(r + 1) * cores_per_rank] for r in range(ep)]


def pin_workers(engine, cores: list[list[int]]) -> list[list[int]]:
    """Every thread of rank r's worker process onto ``cores[r]``; returns what each got."""
    procs = getattr(engine.executor, "procs", None)
    if not procs or len(procs) != len(cores):
        raise SystemExit("the workers' processes are not known: run with the default (mp) executor")
    got = []
    for proc, cpus in zip(procs, cores):
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
        got.append(sorted(os.sched_getaffinity(proc.pid)))
    return got


def measure(engine, ids: list[list[int]], output_len: int) -> dict:
    from moeserve.coordinator.sampling import SamplingParams

    view = engine.expert_load.flush()
    before_logical, before_rank = view.total.clone(), view.rank_load("total").clone()
    steps_before = len(engine.stats.step_times)
    engine.generate(ids, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    steps = engine.stats.step_times[steps_before + 1:]  # decode steps (the first is the batch's prefill)
    view = engine.expert_load.flush()
    rank = (view.rank_load("total") - before_rank).double()  # [L, ep]
    worst = float((rank.mean(-1) / rank.max(-1).values.clamp(min=1)).min())
    return {"decode_tok_s": len(ids) * len(steps) / sum(steps), "median_step_ms": 1e3 * statistics.median(steps),
            "longest_step_ms": 1e3 * max(steps), "decode_steps": len(steps),
            "rank_load": rank.sum(0).tolist(), "max_over_mean_rank_load": float(rank.sum(0).max() / rank.sum(0).mean()),
            "worst_layer_balancedness": worst, "logical": (view.total - before_logical)}


def applied(engine) -> list:
    return [r for r in engine.expert_load.aggregator.rebalances if r.result == "applied"]


def set_interval(engine, interval: int) -> None:
    rebalancer = engine.expert_load.rebalancer
    rebalancer.config = dataclasses.replace(rebalancer.config, interval=interval)


def move_to(engine, target: torch.Tensor) -> None:
    """Move every layer to ``target`` [L, ep, S] through the rebalancer's real chunked point-to-point moves
    (between the paired measurements; the engine is idle)."""
    from moeserve.coordinator.rebalancer import LayerMove

    rebalancer, agg = engine.expert_load.rebalancer, engine.expert_load.aggregator
    for i, layer_id in enumerate(agg.layer_ids):
        if not torch.equal(agg.phy2log[i], target[i]):
            rebalancer.queue.append(LayerMove(layer_id, target[i].clone(), float("nan"), float("nan")))
    while rebalancer.staging:
        engine.expert_load.idle()
        time.sleep(0.001)
    assert torch.equal(agg.phy2log, target)


def time_heaviest_experts(raw: dict, load: torch.Tensor, placements: list[torch.Tensor], cpus: list[int],
                          repeats: int = 15) -> list[float]:
    """For each placement [L, ep, S]: seconds per decode step the heaviest rank of each layer spends in its
    routed experts, summed over layers, with the rows per slot that ``load`` ([L, E] pairs per decode step)
    gives it (copies share evenly), timed on ``cpus`` through the real ``MoE.experts_loop``. The placements'
    timings are interleaved and the fastest of ``repeats`` kept (the least disturbed); a layer placed alike
    in two placements is timed once."""
    from moeserve.experts.expert_map import ExpertPlacement
    from moeserve.experts.moe import MoE
    from moeserve.model.config import ModelConfig

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    config = ModelConfig.from_dict(raw)
    totals = [0.0] * len(placements)
    for layer in range(load.shape[0]):
        cases: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, MoE]] = {}
        keys = []
        for phy2log in placements:
            copies = torch.bincount(phy2log[layer].flatten(), minlength=load.shape[1]).clamp(min=1)
            rows = load[layer][phy2log[layer]] / copies[phy2log[layer]]  # [ep, S]
            slots_rows = tuple(max(0, round(float(r))) for r in rows[int(rows.sum(-1).argmax())])
            keys.append(slots_rows)
            if slots_rows not in cases:
                moe = MoE(config, ExpertPlacement(config.n_routed_experts, tuple(range(len(slots_rows)))),
                          torch.float32)
                with torch.no_grad():
                    moe.w13.normal_(0, 0.05)
                    moe.w2.normal_(0, 0.05)
                slots = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(slots_rows)])
                cases[slots_rows] = (torch.randn(len(slots), config.hidden_size), torch.ones(len(slots), 1), slots, moe)
        best = {key: float("inf") for key in cases}
        with torch.no_grad():
            for _ in range(repeats):
                for key, (x, weights, slots, moe) in cases.items():
                    start = time.perf_counter()
                    moe.experts_loop(x, weights, slots)
                    best[key] = min(best[key], time.perf_counter() - start)
        for k, key in enumerate(keys):
            totals[k] += best[key]
    return totals


def policy_placement(weight: torch.Tensor, start: torch.Tensor, threshold: float, hysteresis: float) -> torch.Tensor:
    """The placement the rebalancer's policy leads to from these counts ([L, E]): the planner's for each layer
    that qualifies (balancedness below ``threshold``, predicted gain at least ``hysteresis``), the start
    placement for the others."""
    from moeserve.coordinator.eplb_policy import predicted_gain
    from moeserve.experts.eplb import balancedness, plan_placement, rank_loads

    planned = plan_placement(weight, start.shape[1], start.shape[2], current=start)
    now, after = balancedness(rank_loads(weight, start)), balancedness(rank_loads(weight, planned))
    out = start.clone()
    for i in range(start.shape[0]):
        if float(now[i]) < threshold and predicted_gain(float(now[i]), float(after[i])) >= hysteresis:
            out[i] = planned[i]
    return out


def run_case(args: argparse.Namespace, raw: dict, skewed: bool, ids: list[list[int]], cores: list[list[int]]) -> dict:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.experts.eplb import balancedness, rank_loads

    root = Path(args.checkpoint or tempfile.mkdtemp(prefix="moeserve-eplb-"))
    model = write_checkpoint(root / ("skewed" if skewed else "even"), raw, skewed)
    placement_file = write_start_placement(root / f"start-ep{args.ep}.json", raw["n_routed_experts"], args.ep,
                                           args.num_redundant_experts)
    config = EngineConfig(model=str(model), device="cpu", tp=args.ep, ep=args.ep,
                          expert_placement=str(placement_file), expert_load_interval=4,
                          eplb_interval=0, eplb_max_stall_ms=args.max_stall_ms, max_num_seqs=len(ids),
                          max_num_batched_tokens=max(2048, len(ids) * args.input_len),
                          skip_tokenizer_init=True, kv_cache_memory=256 << 20)
    engine = Engine(config)
    try:
        pinned = pin_workers(engine, cores)
        rest = sorted(set(os.sched_getaffinity(0)) - {c for cpus in cores for c in cpus})
        if rest:  # the coordinator (this process) on the cores no rank has
            os.sched_setaffinity(0, rest)
        measure(engine, ids, 4)  # warm-up
        start = engine.expert_load.aggregator.phy2log.clone()
        first = measure(engine, ids, args.output_len)  # the start placement's counts, for the prediction
        set_interval(engine, args.eplb_interval)  # online checks on: rebalance until a round moves nothing
        rounds = 0
        while rounds < args.max_rebalance_rounds:
            moved = len(applied(engine))
            measure(engine, ids, args.output_len)
            rounds += 1
            if len(applied(engine)) == moved and not engine.expert_load.rebalancer.staging:
                break
        settled_moves = len(applied(engine))
        settled = [measure(engine, ids, args.output_len) for _ in range(args.repeats)]  # checks still on
        thrash = len(applied(engine)) - settled_moves
        records = list(engine.expert_load.aggregator.rebalances)
        final = engine.expert_load.aggregator.phy2log.clone()
        # paired runs, checks off: the start placement and the final one in turn (moved by the real chunked
        # point-to-point moves), so that a machine getting busier or quieter shifts both alike
        set_interval(engine, 0)
        static, after = [], []
        for k in range(args.repeats):  # A B, B A, A B, ...: an effect of the order cancels out too
            for placement, runs in ((start, static), (final, after))[::1 if k % 2 == 0 else -1]:
                move_to(engine, placement)
                runs.append(measure(engine, ids, args.output_len))
    finally:
        engine.close()
    weight = first["logical"].sum(1).double()
    decode = first["logical"][:, 1].double() / first["decode_steps"]  # [L, E] pairs per decode step
    planned = policy_placement(weight, start, config.eplb_threshold, config.eplb_hysteresis)
    e_static, e_planned = time_heaviest_experts(raw, decode, [start, planned], cores[0])
    t_static = statistics.median(r["median_step_ms"] for r in static) / 1e3
    saved = e_static - e_planned
    predicted = t_static / (t_static - saved) - 1 if saved < t_static else float("nan")
    pairs = [a["decode_tok_s"] / s["decode_tok_s"] - 1 for s, a in zip(static, after)]
    moved = [r for r in records if r.result == "applied"]
    for run in [first, *settled, *static, *after]:
        run.pop("logical")
    return {
        "router": "skewed" if skewed else "even", "pinned_cores": pinned,
        "first": first, "static": static, "after": after, "settled_checks_on": settled, "rebalance_rounds": rounds,
        "layers_moved": len(moved), "moves_after_settling": thrash,
        "backed_off": sum(1 for r in records if r.result == "backed-off"),
        "slots_moved": sum(r.moves for r in moved), "chunks": sum(r.chunks for r in moved),
        "longest_chunk_stall_ms": 1e3 * max((r.max_stall_s for r in moved), default=0.0),
        "chunks_over_bound": sum(r.over_bound for r in moved),
        "balancedness_static": balancedness(rank_loads(weight, start)).tolist(),
        "balancedness_planned": balancedness(rank_loads(weight, planned)).tolist(),
        "heaviest_rank_wasted_share": float((1 - balancedness(rank_loads(decode, start))).mean()),
        "expert_share_of_step": e_static / t_static,
        "heaviest_expert_ms_static": 1e3 * e_static, "heaviest_expert_ms_planned": 1e3 * e_planned,
        "predicted_gain_pct": 100 * predicted,
        "measured_gain_pct": 100 * statistics.median(pairs), "measured_gain_pct_pairs": [100 * g for g in pairs],
        "placement": final.tolist(),
    }


def summary(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"bench_eplb: ep {args.ep}, {args.cores_per_rank} core(s) per rank (pinned, disjoint), "
             f"{args.num_redundant_experts} redundant slots, {args.num_prompts} prompts x {args.output_len} tokens, "
             f"hidden {args.hidden_size}, {args.num_experts} experts top-{args.top_k} of width "
             f"{args.moe_intermediate_size}, {args.layers} layers",
             "| router | worst-layer balancedness static -> after | expert share of step | heaviest rank wasted "
             "| predicted gain | measured gain (pairs) | decode tok/s static -> after | layers moved (once settled) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        tok_static = statistics.median(x["decode_tok_s"] for x in r["static"])
        tok_after = statistics.median(x["decode_tok_s"] for x in r["after"])
        bal_static = statistics.median(x["worst_layer_balancedness"] for x in r["static"])
        bal_after = statistics.median(x["worst_layer_balancedness"] for x in r["after"])
        pairs = ", ".join(f"{g:+.1f}" for g in r["measured_gain_pct_pairs"])
        lines.append(f"| {r['router']} | {bal_static:.3f} -> {bal_after:.3f} "
                     f"| {100 * r['expert_share_of_step']:.0f}% | {100 * r['heaviest_rank_wasted_share']:.0f}% "
                     f"| {r['predicted_gain_pct']:+.1f}% | {r['measured_gain_pct']:+.1f}% ({pairs}) "
                     f"| {tok_static:.1f} -> {tok_after:.1f} | {r['layers_moved']} ({r['moves_after_settling']}) |")
    even = [r for r in results if r["router"] == "even"]
    if even and even[0]["layers_moved"] == 0:
        spread = even[0]["measured_gain_pct_pairs"]
        lines.append(f"noise floor: the even case's pairs run one placement twice; their spread here is "
                     f"{min(spread):+.1f}% .. {max(spread):+.1f}%")
    lines.append("measured gain: median over paired runs (each pair: the start placement and the rebalanced one, "
                 "in alternating order, moved to by the real chunked moves); tok/s and balancedness: medians; layers "
                 "moved in brackets: moves once settled with the checks still on (thrash: must be 0).")
    for r in results:
        lines.append(f"{r['router']}: {r['slots_moved']} slots moved in {r['chunks']} chunks, longest stall "
                     f"{r['longest_chunk_stall_ms']:.1f} ms (bound {args.max_stall_ms} ms, "
                     f"{r['chunks_over_bound']} chunk(s) over it)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--cores-per-rank", type=int, default=0, help="default: the allowed cores / ep")
    parser.add_argument("--num-redundant-experts", type=int, default=-1, help="default: one per rank")
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="paired runs (start placement, rebalanced)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--moe-intermediate-size", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shared-experts", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eplb-interval", type=int, default=8)
    parser.add_argument("--max-stall-ms", type=float, default=20.0)
    parser.add_argument("--max-rebalance-rounds", type=int, default=4)
    parser.add_argument("--no-even", action="store_true", help="skip the already-even case")
    parser.add_argument("--checkpoint", default="", help="where the checkpoints are (or are written)")
    parser.add_argument("--json", default="", help="also write the full results here")
    args = parser.parse_args()
    args.cores_per_rank = args.cores_per_rank or max(1, len(os.sched_getaffinity(0)) // args.ep)
    if args.num_redundant_experts < 0:
        args.num_redundant_experts = args.ep

    raw = model_config(args)
    cores = rank_core_sets(args.ep, args.cores_per_rank)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, raw["vocab_size"], (args.input_len,), generator=gen).tolist()
           for _ in range(args.num_prompts)]
    results = [run_case(args, raw, True, ids, cores)]
    if not args.no_even:
        results.append(run_case(args, raw, False, ids, cores))
    out = {"config": vars(args), "model": raw, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print()
    print(summary(results, args))


if __name__ == "__main__":
    main()
