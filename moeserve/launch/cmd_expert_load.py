"""``moeserve expert-load``: fetch a running server's expert load (``GET /v1/expert_load``) and write the
``[layers, experts]`` matrix as safetensors, and optionally the placement the EPLB planner would choose
for it (a ``--expert-placement`` JSON file)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

NEEDS_ENGINE_ARGS = False


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("expert-load", help="save a running server's expert load ([layers, experts], safetensors)")
    p.add_argument("--url", required=True, help="the server's HTTP base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, type=Path, help="safetensors file to write")
    p.add_argument("--scope", choices=("total", "window"), default="total",
                   help="since the server started (default) or its latest window")
    p.add_argument("--api-key", default=None, help="the server's API key (default: MOESERVE_API_KEY)")
    p.add_argument("--placement-out", type=Path, default=None,
                   help="also write the placement the planner would choose (JSON for --expert-placement)")
    p.add_argument("--num-redundant-experts", type=int, default=None,
                   help="with --placement-out: redundant slots in all (default: as many as the server has)")
    return p


def fetch(url: str, scope: str, api_key: str | None) -> dict:
    import httpx

    key = api_key or os.environ.get("MOESERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url.rstrip("/") + "/v1/expert_load", params={"scope": scope}, headers=headers, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"moeserve expert-load: {url} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    body = fetch(args.url, args.scope, args.api_key)
    tensors = {name: torch.tensor(body[name], dtype=torch.int64).contiguous()
               for name in ("load", "prefill", "decode", "rank_load")}
    tensors["layers"] = torch.tensor(body["layers"], dtype=torch.int64)
    save_file(tensors, str(args.out), metadata={"scope": body["scope"], "step": str(body["step"]),
                                                "source": args.url})
    print(f"wrote {args.out}: load {list(tensors['load'].shape)} ({body['scope']}, step {body['step']})")
    if args.placement_out is not None:
        per_layer = body.get("phy2log")  # [layers][ranks][slots]: the file takes one for every layer
        write_placement(args, tensors["load"], per_layer[0] if per_layer else None)
    return 0


def write_placement(args: argparse.Namespace, load, current: list[list[int]] | None) -> None:
    import torch

    from moeserve.experts.eplb import plan_placement

    if current is None:
        sys.exit("moeserve expert-load: the server has no expert parallelism; there is no placement to plan")
    ranks, slots = len(current), len(current[0])
    if args.num_redundant_experts is not None:
        slots, rest = divmod(load.shape[1] + args.num_redundant_experts, ranks)
        if rest:
            sys.exit(f"moeserve expert-load: experts + redundant must divide over {ranks} ranks")
    new = plan_placement(load.sum(0, keepdim=True), ranks, slots,
                         current=torch.tensor([current]) if slots == len(current[0]) else None)
    args.placement_out.write_text(json.dumps({"phy2log": new[0].tolist()}) + "\n")
    print(f"wrote {args.placement_out}: {ranks} ranks x {slots} slots")
