"""``moeserve plan``: how a model would be laid out over pp x tp x ep ranks, and what fits in memory.

Reads only the checkpoint's config.json (no weights): prints the layer split, the experts of each rank,
each rank's weight bytes (FP8 routed experts as the engine keeps them on the given device) and the
latent-cache capacity; exits 1 with the reason when the plan is infeasible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeserve.coordinator.plan import ParallelPlan

NEEDS_ENGINE_ARGS = False
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
              "TI": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``141GB``, ``80G``, ``64GiB`` (decimal units unless ``i``)."""
    value = text.strip().upper().removesuffix("B")
    number = value.rstrip("KMGTI")
    unit = value[len(number):]
    try:
        return int(float(number) * SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 141GB, 80GiB, 1000000)") from None


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="show the parallel plan (layer split, experts, memory) for a topology")
    p.add_argument("--model", default="", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per replica")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree: 1 (experts tensor-parallel) or tp (default: tp)")
    p.add_argument("--replicas", type=int, default=1, help="full copies of the model")
    p.add_argument("--pp-layers", default="", help="layers per stage by hand, e.g. 14,13")
    p.add_argument("--placement", type=Path, default=None,
                   help='JSON file {"phy2log": [[experts of EP rank 0], ...]} (default: contiguous)')
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weight and cache dtype; auto = what a run on --device uses: float32 on cpu, bfloat16 "
                        "on cuda and npu (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or npu: decides the --keep-fp8 default")
    p.add_argument("--keep-fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="FP8 checkpoints: count routed experts as float8 + block scales (default: on unless cpu)")
    p.add_argument("--memory-per-rank", type=parse_size, default=None,
                   help="device memory of one rank, in bytes or with a unit (141GB, 80GiB; default: unbounded)")
    p.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="latent-cache bytes per rank (default: what --memory-per-rank leaves after weights)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (default: a table)")
    return p


def run(args: argparse.Namespace) -> int:
    from moeserve.comm.topology import ParallelDims
    from moeserve.coordinator.config import default_model_path
    from moeserve.coordinator.plan import format_plan, make_plan, parse_pp_layers
    from moeserve.dtypes import serving_dtype
    from moeserve.model.config import ModelConfig

    try:
        config = ModelConfig.from_hf(args.model or default_model_path())
        dims = ParallelDims.from_args(args.pp, args.tp, args.ep, args.replicas)
        pp_layers = parse_pp_layers(args.pp_layers, config.num_hidden_layers, dims.pp) if args.pp_layers else None
        keep_fp8 = args.device.split(":")[0] != "cpu" if args.keep_fp8 is None else args.keep_fp8
        dtype_bytes = serving_dtype(args.dtype, args.device).itemsize  # the dtype serve and generate pick
        plan = make_plan(config, dims, dtype_bytes, kv_cache_bytes_per_rank=args.kv_cache_memory,
                         memory_per_rank=args.memory_per_rank, pp_layers=pp_layers,
                         placement_file=args.placement, keep_fp8=keep_fp8)
    except ValueError as e:  # ConfigError, InfeasiblePlanError and bad settings are all ValueErrors
        print(f"moeserve plan: {e}", file=sys.stderr)
        return 1
    print(json.dumps(plan_json(plan)) if args.json else format_plan(plan))
    return 0


def plan_json(plan: ParallelPlan) -> dict[str, Any]:
    """The plan as plain JSON values; per-rank entries are the ranks of replica 0."""
    tokens, cache = plan.kv_tokens_per_rank, plan.kv_cache_bytes
    stages = [{"stage": s, "layers": [r.start, r.stop], "ranks": plan.dims.stage_ranks(0, s),
               "cache_bytes_per_token": plan.cache_bytes_per_token(s)} for s, r in enumerate(plan.stage_ranges)]
    ranks = [{"rank": rank, "stage": rank // plan.dims.tp, "tp_rank": rank % plan.dims.tp,
              "experts": list(plan.experts_of(rank)), "weight_bytes": w.total, "weights": dataclasses.asdict(w),
              "kv_cache_bytes": None if cache is None else cache[rank],
              "kv_tokens": None if tokens is None else tokens[rank]} for rank, w in enumerate(plan.rank_weights)]
    return {"dims": dataclasses.asdict(plan.dims), "world_size": plan.dims.world_size,
            "dtype_bytes": plan.dtype_bytes, "fp8_block": plan.fp8_block, "stages": stages, "ranks": ranks,
            "kv_capacity_tokens": plan.kv_capacity_tokens, "total_weight_bytes": plan.total_weight_bytes}
