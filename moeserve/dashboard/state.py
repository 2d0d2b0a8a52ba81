"""What the expert-load routes send: the JSON of ``GET /v1/expert_load`` and the dashboard's state, both
plain dicts built from one immutable ``LoadView``."""

from __future__ import annotations

from typing import Any

import torch

from moeserve.coordinator.expert_load import LoadView
from moeserve.experts.eplb import plan_dry_run

NUM_HOTTEST = 10


def load_json(view: LoadView, scope: str = "total") -> dict[str, Any]:
    """The [layers, experts] load of ``scope`` ("window" or "total"), prefill and decode apart and summed,
    with the per-rank load and the placement it was served by."""
    logical = view.window if scope == "window" else view.total
    return {
        "object": "expert_load", "scope": scope, "step": view.step, "time": view.time,
        "window_s": view.window_s if scope == "window" else None,
        "layers": list(view.layer_ids), "num_experts": int(logical.shape[-1]),
        "load": logical.sum(1).tolist(), "prefill": logical[:, 0].tolist(), "decode": logical[:, 1].tolist(),
        "rank_load": view.rank_load(scope).tolist(), "ranks": [list(r) for r in view.rank_ids],
        "balancedness": view.balancedness(scope).tolist(),
        "phy2log": None if view.phy2log is None else view.phy2log.tolist(),
    }


def hottest(load: torch.Tensor, layer_ids: tuple[int, ...], num: int = NUM_HOTTEST) -> list[dict[str, Any]]:
    """load: [layers, experts] -> the ``num`` hottest (layer, expert) cells with their share of the layer."""
    if load.numel() == 0:
        return []
    flat = load.flatten()
    values, index = torch.topk(flat, min(num, flat.numel()))
    per_layer = load.sum(-1).clamp(min=1)
    out = []
    for value, i in zip(values.tolist(), index.tolist()):
        row, expert = divmod(i, load.shape[-1])
        out.append({"layer": layer_ids[row], "expert": expert, "tokens": value,
                    "share": value / float(per_layer[row])})
    return out


def dashboard_state(view: LoadView) -> dict[str, Any]:
    """Everything the page draws, in one event."""
    window, total = view.window.sum(1), view.total.sum(1)
    placement = None if view.phy2log is None else view.phy2log.tolist()
    copies: list[int] = []
    if view.phy2log is not None:
        held = torch.bincount(view.phy2log.flatten(), minlength=window.shape[-1])
        copies = (held > 1).nonzero().flatten().tolist()
    return {
        "step": view.step, "time": view.time, "window_s": view.window_s, "layers": list(view.layer_ids),
        "num_experts": int(window.shape[-1]), "ranks": [list(r) for r in view.rank_ids],
        "expert_window": window.tolist(), "expert_total": total.tolist(),
        "rank_window": view.rank_load("window").tolist(), "rank_total": view.rank_load("total").tolist(),
        "balancedness": view.balancedness().tolist(),
        "history": [list(h) for h in view.history],
        "rebalances": [{"time": r.time, "step": r.step, "result": r.result, "seconds": r.seconds,
                        "before": r.balancedness_before, "after": r.balancedness_after} for r in view.rebalances],
        "hottest": hottest(window if int(window.sum()) else total, view.layer_ids),
        "placement": placement, "copies": copies, "plan": plan_dry_run(view),
    }
