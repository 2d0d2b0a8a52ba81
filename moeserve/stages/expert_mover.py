"""Online expert re-placement on one rank: a chunk of one MoE layer's new placement, moved and applied.

The coordinator's rebalancer sends ``PlacementMsg`` (a layer and its placement after the chunk) in order
with the step plans, so every rank of the stage handles it between the same two steps. Each changed slot
takes its weights from a rank that holds the expert now (``expert_moves.transfers``): a local copy, or a
point-to-point receive over the stage's tensor-parallel group from the holder, which sends its rows at the
same moment -- weights that are not on this node's disk move just as well. Once every row has arrived the
rows are written into the expert tensors and the layer's ``ExpertMap`` takes the new placement, in place;
the expert-load counter restarts that layer's physical slots. The rebalancer keeps each chunk small enough
that the step after it waits no longer than its stall bound.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moeserve.experts.expert_map import ExpertPlacement
from moeserve.experts.expert_moves import Transfer, transfers
from moeserve.experts.moe import MoE

if TYPE_CHECKING:
    from moeserve.stages.runner import ModelRunner


def apply_placement(moe: MoE, placement: ExpertPlacement) -> None:
    """Make ``moe`` route with ``placement`` (its weights must already match the new slots): its
    ``ExpertMap`` is written in place, so captured CUDA graphs read the new tables."""
    moe.expert_map.update(placement)
    moe.slots_changed()


def move_experts(moe: MoE, moves: list[Transfer]) -> int:
    """Copy the weights of the changed slots of ``moe`` (every rank of its group calls this with the same
    ``moves``); returns the bytes this rank received."""
    me, shard = moe.expert_map.rank, moe.shard
    tensors = moe.expert_tensors
    incoming = [m for m in moves if m.dst == me]
    rows = {(m.dst_slot, name): torch.empty_like(t[m.dst_slot]) for m in incoming for name, t in tensors.items()}
    ops = []
    for i, m in enumerate(moves):
        if m.src == m.dst or me not in (m.src, m.dst):
            continue
        for j, (name, t) in enumerate(tensors.items()):
            tag = i * len(tensors) + j
            if m.src == me:
                ops.append(dist.P2POp(dist.isend, t[m.src_slot].contiguous(), dist.get_global_rank(shard.group, m.dst),
                                      shard.group, tag))
            else:
                ops.append(dist.P2POp(dist.irecv, rows[m.dst_slot, name], dist.get_global_rank(shard.group, m.src),
                                      shard.group, tag))
    for m in incoming:  # local copies, read before any slot is written
        if m.src == me:
            for name, t in tensors.items():
                rows[m.dst_slot, name].copy_(t[m.src_slot])
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    with torch.no_grad():
        for (slot, name), row in rows.items():
            tensors[name][slot].copy_(row)
    return sum(row.numel() * row.element_size() for row in rows.values())


class ExpertMover:
    """Applies the chunks of new placements this rank is sent (``apply``)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def apply(self, layer_id: int, phy2log: list[list[int]]) -> int:
        """Move layer ``layer_id``'s changed slots to ``phy2log`` [ep][slots] and route with it; returns the
        bytes received (0 where the layer is on another stage)."""
        moe = self.runner.model.moe_layers().get(layer_id)
        if moe is None:
            return 0
        current = moe.expert_map.placement
        if not current.all_ranks:
            raise ValueError("this rank does not know its layer's whole placement: it cannot take moves")
        new = torch.tensor(phy2log, dtype=torch.long)
        old = torch.tensor(current.all_ranks, dtype=torch.long)
        if new.shape != old.shape:
            raise ValueError(f"the new placement of layer {layer_id} is {list(new.shape)} [ranks, slots], this "
                             f"layer's is {list(old.shape)}: the number of slots cannot change while serving")
        received = move_experts(moe, transfers(old, new))
        apply_placement(moe, ExpertPlacement.from_ranks(phy2log, current.rank, current.num_logical))
        if self.runner.expert_load is not None:
            self.runner.expert_load.placement_changed(layer_id)
        return received

    def timed_apply(self, layer_id: int, phy2log: list[list[int]]) -> tuple[float, int]:
        """``apply``, with the seconds it held the rank up (the device waited for)."""
        start = time.perf_counter()
        received = self.apply(layer_id, phy2log)
        device = self.runner.device
        getattr(torch, device.type).synchronize(device)  # what the device was asked to do has run (cpu: nothing)
        return time.perf_counter() - start, received
