"""The expert-parallel load balancer (EPLB): from a load matrix, choose which experts get redundant copies
and which rank holds each copy, so that the most loaded rank is as light as possible, moving as few experts
as possible from the current placement. Pure functions on tensors (shapes in the docstrings).

Copies of an expert share its tokens evenly (``ep_dispatch.pick_owner`` takes them in turn), so a copy's
predicted load is ``weight / copies``. With several nodes the planner is hierarchical, as DeepSeek's EPLB:
experts are first packed onto nodes (whole expert groups when the router is group-limited, so that a
token's experts stay on few nodes), then replicated and packed onto the ranks of each node.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def replicate(weight: torch.Tensor, num_slots: int, max_copies: int) -> torch.Tensor:
    """weight: [L, E] load per expert -> copies [L, E] (>= 1, <= max_copies, sum = num_slots per layer).
    Each extra slot goes to the expert whose copies would carry the most load each."""
    num_layers, num_experts = weight.shape
    if not num_experts <= num_slots <= num_experts * max_copies:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts with at most {max_copies} copies")
    copies = torch.ones(num_layers, num_experts, dtype=torch.long)
    w = weight.double()
    for _ in range(num_slots - num_experts):
        per_copy = torch.where(copies < max_copies, w / copies, torch.full_like(w, -1.0))
        copies[torch.arange(num_layers), per_copy.argmax(-1)] += 1
    return copies


def pack(weight: torch.Tensor, copies: torch.Tensor, num_ranks: int, prefer: list[list[int]] | None = None,
         cap: float = float("inf")) -> list[list[int]]:
    """weight, copies: [E] of one layer -> per rank the experts it holds ([num_ranks][slots], unordered).

    The heaviest copy goes first, each to the least loaded rank with a free slot that does not hold that
    expert yet (so no rank holds two copies of one expert). With ``prefer`` (per rank, the experts it holds
    now) a copy stays on a rank that holds its expert now when that keeps the rank's load within ``cap``."""
    num_slots = int(copies.sum())
    if num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not split evenly over {num_ranks} ranks")
    per_rank = num_slots // num_ranks
    items = [(float(weight[e]) / int(copies[e]), e) for e in range(len(copies)) for _ in range(int(copies[e]))]
    items.sort(key=lambda it: (-it[0], it[1]))
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0.0] * num_ranks
    for w, e in items:
        free = [r for r in range(num_ranks) if len(held[r]) < per_rank and e not in held[r]]
        stay = [r for r in free if prefer is not None and e in prefer[r] and load[r] + w <= cap]
        if stay:
            r = min(stay, key=lambda r: (load[r], r))
        elif free:
            r = min(free, key=lambda r: (load[r], r))
        else:
            r = _make_room(held, e, per_rank)
        held[r].append(e)
        load[r] += w
    return held


def pack_near(weight: torch.Tensor, copies: torch.Tensor, num_ranks: int, current: list[list[int]] | None,
              tolerance: float = 0.02) -> list[list[int]]:
    """``pack``, staying on the current placement wherever that costs the heaviest rank at most
    ``tolerance`` (relative) over packing from scratch."""
    fresh = pack(weight, copies, num_ranks)
    if current is None:
        return fresh
    peak = _peak(weight, copies, fresh)
    sticky = pack(weight, copies, num_ranks, current, cap=peak * (1 + tolerance))
    return sticky if _peak(weight, copies, sticky) <= peak * (1 + tolerance) else fresh


def _peak(weight: torch.Tensor, copies: torch.Tensor, held: list[list[int]]) -> float:
    return max(sum(float(weight[e]) / int(copies[e]) for e in ids) for ids in held)


def _make_room(held: list[list[int]], expert: int, per_rank: int) -> int:
    """Every rank with a free slot holds ``expert``: move another expert from a full rank that does not
    hold it into the free slot, and return that full rank (which now has room)."""
    spare = next(r for r, ids in enumerate(held) if len(ids) < per_rank)
    full = next(r for r, ids in enumerate(held) if expert not in ids)
    moved = next(e for e in held[full] if e not in held[spare])
    held[full].remove(moved)
    held[spare].append(moved)
    return full


def keep_slots(new: list[list[int]], current: torch.Tensor | None) -> torch.Tensor:
    """new: per rank the experts it should hold; current: [R, S] the placement now (or None) -> [R, S].

    Ranks are interchangeable, so each new set goes to the rank that already holds most of it, and an
    expert a rank keeps stays in its slot: only the slots whose expert changes need new weights."""
    num_ranks, per_rank = len(new), len(new[0])
    if current is None or tuple(current.shape) != (num_ranks, per_rank):
        return torch.tensor([sorted(ids) for ids in new], dtype=torch.long)
    cur = current.tolist()
    overlap = [[len(set(ids) & set(cur[r])) for r in range(num_ranks)] for ids in new]
    pairs = sorted(((overlap[i][r], -i, -r) for i in range(num_ranks) for r in range(num_ranks)), reverse=True)
    owner: dict[int, int] = {}
    taken: set[int] = set()
    for _, i, r in pairs:
        if -i not in owner and -r not in taken:
            owner[-i] = -r
            taken.add(-r)
    out = [[-1] * per_rank for _ in range(num_ranks)]
    for i, ids in enumerate(new):
        r = owner[i]
        rest = [e for e in ids if e not in cur[r]]
        for s, e in enumerate(cur[r]):
            if e in ids:
                out[r][s] = e
        free = [s for s in range(per_rank) if out[r][s] < 0]
        for s, e in zip(free, sorted(rest)):
            out[r][s] = e
    return torch.tensor(out, dtype=torch.long)


def node_groups(weight: torch.Tensor, num_nodes: int, num_groups: int) -> list[list[int]]:
    """weight: [E] -> the experts of each node ([num_nodes][E / num_nodes]): whole groups of
    ``E / num_groups`` consecutive experts when ``num_groups`` divides over the nodes, else single experts,
    packed heaviest first onto the lightest node with room."""
    num_experts = len(weight)
    unit = num_experts // num_groups if num_groups % num_nodes == 0 and num_experts % num_groups == 0 else 1
    units = [list(range(u, u + unit)) for u in range(0, num_experts, unit)]
    units.sort(key=lambda ids: -float(weight[ids].sum()))
    cap = len(units) // num_nodes
    nodes: list[list[int]] = [[] for _ in range(num_nodes)]
    load = [0.0] * num_nodes
    for ids in units:
        n = min((n for n in range(num_nodes) if len(nodes[n]) < cap * unit), key=lambda n: (load[n], n))
        nodes[n] += ids
        load[n] += float(weight[ids].sum())
    return nodes


def plan_placement(weight: torch.Tensor, num_ranks: int, slots_per_rank: int, num_nodes: int = 1,
                   num_groups: int = 1, current: torch.Tensor | None = None) -> torch.Tensor:
    """weight: [L, E] load per logical expert -> phy2log [L, num_ranks, slots_per_rank].

    ``num_ranks * slots_per_rank - E`` slots are redundant copies; ``current``: [L, R, S] the placement
    now, from which as few slots as possible change. Ranks ``n * R / num_nodes ..`` form node n; when a
    node's share of the experts (E / num_nodes) is fewer than a rank's slots, the plan is not hierarchical."""
    num_layers, num_experts = weight.shape
    if num_ranks % num_nodes or num_experts % num_nodes:
        raise ValueError(f"{num_ranks} ranks and {num_experts} experts must split evenly over {num_nodes} nodes")
    if slots_per_rank > num_experts // num_nodes:
        num_nodes = 1  # NOTE: a node's share of the experts cannot fill a rank: plan over all ranks at once
    ranks_per_node = num_ranks // num_nodes
    out = []
    for layer in range(num_layers):
        w = weight[layer].double()
        nodes = node_groups(w, num_nodes, num_groups) if num_nodes > 1 else [list(range(num_experts))]
        cur = None if current is None else current[layer]
        held: list[list[int]] = []
        for n, ids in enumerate(nodes):
            copies = replicate(w[ids].unsqueeze(0), ranks_per_node * slots_per_rank, ranks_per_node)[0]
            local = {e: i for i, e in enumerate(ids)}  # node-local expert index
            now = None if cur is None or cur.shape[1] != slots_per_rank else \
                [[local[e] for e in rank if e in local] for rank in cur[n * ranks_per_node:(n + 1) * ranks_per_node].tolist()]
            packed = pack_near(w[ids], copies, ranks_per_node, now)
            held += [[ids[i] for i in rank] for rank in packed]
        out.append(torch.cat([keep_slots(held[n * ranks_per_node:(n + 1) * ranks_per_node],
                                         None if cur is None else cur[n * ranks_per_node:(n + 1) * ranks_per_node])
                              for n in range(num_nodes)]))
    return torch.stack(out)


def rank_loads(weight: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """weight: [L, E], phy2log: [L, R, S] -> [L, R] predicted load per rank (copies share evenly)."""
    num_layers, num_ranks, _ = phy2log.shape
    flat = phy2log.reshape(num_layers, -1)
    copies = torch.zeros_like(weight, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    per_copy = weight.double() / copies.clamp(min=1)
    return per_copy.gather(1, flat).view(num_layers, num_ranks, -1).sum(-1)


def num_moves(current: torch.Tensor, new: torch.Tensor) -> int:
    """Slots whose expert changes (each needs its weights copied)."""
    return int((current != new).sum())


def plan_dry_run(view: Any, num_redundant: int | None = None) -> dict[str, Any] | None:
    """What the planner would do with a ``LoadView``'s load since start, each layer on its own (as the
    rebalancer plans): per layer the placement, the balancedness now and predicted, the predicted gain
    (how much faster the heaviest rank gets) and the slots that move."""
    if view.phy2log is None or not len(view.layer_ids) or int(view.total.sum()) == 0:
        return None
    current = view.phy2log  # [L, R, S]
    num_layers, num_ranks, slots = current.shape
    weight = view.total.sum(1).double()  # [L, E]
    if num_redundant is not None:
        slots = (weight.shape[-1] + num_redundant) // num_ranks
    same = slots == current.shape[2]
    new = plan_placement(weight, num_ranks, slots, current=current if same else None)
    now = balancedness(rank_loads(weight, current))
    after = balancedness(rank_loads(weight, new))
    moves = [num_moves(current[i], new[i]) if same else new[i].numel() for i in range(num_layers)]
    return {"phy2log": new.tolist(), "balancedness_now": now.tolist(), "balancedness_after": after.tolist(),
            "predicted_gain": (after / now.clamp(min=1e-12) - 1).tolist(), "moves": moves}


def balancedness(rank_load: torch.Tensor) -> torch.Tensor:
    """rank_load: [layers, ranks] -> [layers] mean / max over ranks (1.0 where a layer had no load)."""
    load = rank_load.double().numpy()
    peak = load.max(-1) if load.shape[-1] else np.zeros(load.shape[:-1])
    mean = load.mean(-1) if load.shape[-1] else peak
    return torch.from_numpy(np.where(peak > 0, mean / np.maximum(peak, 1e-12), 1.0))
