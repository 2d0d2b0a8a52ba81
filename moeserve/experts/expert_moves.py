"""How one MoE layer goes from its placement to a new one: which slots change, in which chunks, and where
each changed slot's weights come from. Pure functions on [ep, slots] placements (``phy2log``).

A rebalance is cut into chunks of at most ``max_slots`` changed slots (``next_chunk``) so that no step waits
for more than one chunk's copies; every placement between two chunks is one the layer can serve with
(every logical expert still held by some rank). Within a chunk a changed slot's weights come from a rank
that holds the expert before the chunk (``transfers``): the same rank when it holds it in another slot,
else one of the holders, taken in turn -- never from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Transfer:
    """Slot ``dst_slot`` of EP rank ``dst`` takes the weights now in slot ``src_slot`` of rank ``src``."""

    dst: int
    dst_slot: int
    src: int
    src_slot: int


def changed_slots(current: torch.Tensor, target: torch.Tensor) -> list[tuple[int, int]]:
    """(rank, slot) whose logical expert differs, rank-major."""
    return [tuple(rs) for rs in (current != target).nonzero().tolist()]  # type: ignore[misc]


def serves_every_expert(phy2log: torch.Tensor, num_logical: int) -> bool:
    return bool((torch.bincount(phy2log.flatten(), minlength=num_logical) > 0).all())


def next_chunk(current: torch.Tensor, target: torch.Tensor, max_slots: int, num_logical: int) -> torch.Tensor:
    """The placement after the next chunk: ``current`` with at most ``max_slots`` of its changed slots set to
    ``target`` (more only where experts swap places in a cycle that no smaller chunk can break), chosen so
    that every expert stays held. Returns ``target`` itself once it is within reach."""
    pending = changed_slots(current, target)
    if len(pending) <= max_slots:
        return target.clone()
    out = current.clone()
    done = 0
    progress = True
    while done < max_slots and progress:
        progress = False
        for rank, slot in pending:
            if done >= max_slots:
                break
            if out[rank, slot] == target[rank, slot]:
                continue
            trial = out.clone()
            trial[rank, slot] = target[rank, slot]
            if serves_every_expert(trial, num_logical):  # the expert overwritten is held elsewhere too
                out, done, progress = trial, done + 1, True
    if done:
        return out
    # NOTE: every pending change overwrites an expert's last copy (experts trade places): the smallest prefix
    # of the changes after which every expert is held again goes together
    for rank, slot in pending:
        out[rank, slot] = target[rank, slot]
        if serves_every_expert(out, num_logical):
            return out
    return target.clone()


def transfers(current: torch.Tensor, new: torch.Tensor) -> list[Transfer]:
    """Where each changed slot's weights come from, every rank computing the same list: a slot of the same
    rank holding the expert now, else a holder's slot, the holders of an expert taken in turn."""
    cur = current.tolist()
    turn: dict[int, int] = {}
    out = []
    for rank, slot in changed_slots(current, new):
        expert = int(new[rank, slot])
        if expert in cur[rank]:
            out.append(Transfer(rank, slot, rank, cur[rank].index(expert)))
            continue
        holders = [r for r, ids in enumerate(cur) if expert in ids]
        if not holders:
            raise ValueError(f"expert {expert} is held by no rank before the move: it cannot be copied")
        src = holders[turn.get(expert, 0) % len(holders)]
        turn[expert] = turn.get(expert, 0) + 1
        out.append(Transfer(rank, slot, src, cur[src].index(expert)))
    return out
