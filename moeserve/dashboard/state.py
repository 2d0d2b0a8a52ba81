"""What the expert-load routes send: the JSON of ``GET /v1/expert_load`` and the dashboard's state, both
plain dicts built from one immutable ``LoadView``."""

from __future__ import annotations

from typing import Any

import torch

from moeserve.coordinator.expert_load import LoadView, sum_views
from moeserve.experts.eplb import plan_dry_run

NUM_HOTTEST = 10


def load_json(view: LoadView, scope: str = "total") -> dict[str, Any]:
    """The [layers, experts] load of ``scope`` ("window" or "total"), prefill and decode apart and summed,
    with the per-rank load, each layer's placement (``phy2log`` [layers][ranks][slots]) and its balancedness
    since that placement began."""
    logical = view.window if scope == "window" else view.total
    return {
        "object": "expert_load", "scope": scope, "step": view.step, "time": view.time,
        "window_s": view.window_s if scope == "window" else None,
        "layers": list(view.layer_ids), "num_experts": int(logical.shape[-1]),
        "load": logical.sum(1).tolist(), "prefill": logical[:, 0].tolist(), "decode": logical[:, 1].tolist(),
        "rank_load": view.rank_load(scope).tolist(), "ranks": [list(r) for r in view.rank_ids],
        "balancedness": view.balancedness(scope).tolist(),
        "phy2log": None if view.phy2log is None else view.phy2log.tolist(),
        "balancedness_placement": view.balancedness("placement").tolist(),
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


def copies_per_layer(phy2log: torch.Tensor, num_experts: int) -> list[list[int]]:
    """phy2log: [layers, ep, slots] -> per layer the experts with more than one copy."""
    return [(torch.bincount(layer.flatten(), minlength=num_experts) > 1).nonzero().flatten().tolist()
            for layer in phy2log]


def window_steps(view: LoadView) -> int:
    """Engine steps the latest window covers (from the balancedness history)."""
    return view.history[-1][1] - view.history[-2][1] if len(view.history) >= 2 else view.step


def dashboard_state(view: LoadView) -> dict[str, Any]:
    """Everything the page draws, in one event. Every figure names its window: "window" (the latest one,
    ``window_steps`` steps over ``window_s`` seconds), "total" (since start) or "placement" (since each
    layer's current placement began)."""
    window, total = view.window.sum(1), view.total.sum(1)
    placement = None if view.phy2log is None else view.phy2log.tolist()
    return {
        "step": view.step, "time": view.time, "window_s": view.window_s, "window_steps": window_steps(view),
        "layers": list(view.layer_ids), "num_experts": int(window.shape[-1]), "num_ranks": view.num_ranks,
        "ranks": [list(r) for r in view.rank_ids],
        "expert_window": window.tolist(), "expert_total": total.tolist(),
        "rank_window": view.rank_load("window").tolist(), "rank_total": view.rank_load("total").tolist(),
        "balancedness": view.balancedness().tolist(), "balancedness_total": view.balancedness("total").tolist(),
        "balancedness_placement": view.balancedness("placement").tolist(),
        "placement_pairs": view.rank_load("placement").sum(-1).tolist(),
        "history": [list(h) for h in view.history],
        "rebalances": [{"time": r.time, "step": r.step, "result": r.result, "seconds": r.seconds,
                        "before": r.balancedness_before, "after": r.balancedness_after, "layer": r.layer,
                        "moves": r.moves, "chunks": r.chunks, "max_stall_s": r.max_stall_s,
                        "measured_after": None if r.measured_after != r.measured_after else r.measured_after}
                       for r in view.rebalances if r.result != "skipped"],
        "checks_skipped": sum(1 for r in view.rebalances if r.result == "skipped"),
        "hottest": hottest(window if int(window.sum()) else total, view.layer_ids),
        "hottest_scope": "window" if int(window.sum()) else "total",
        "placement": placement,
        "copies": [] if view.phy2log is None else copies_per_layer(view.phy2log, int(window.shape[-1])),
        "plan": plan_dry_run(view),
    }


def dashboard_states(views: list[LoadView]) -> dict[str, Any]:
    """The page's event: one state per replica (``label`` names it), after their sum when there are
    several (``sum_views``)."""
    states = [{**dashboard_state(v), "label": f"replica {i}"} for i, v in enumerate(views)]
    if len(views) > 1:
        states.insert(0, {**dashboard_state(sum_views(views)), "label": f"all {len(views)} replicas (summed)"})
    return {"states": states}
