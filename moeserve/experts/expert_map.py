"""The expert map of one MoE layer: which logical experts each EP rank holds (``ExpertPlacement``) and the
routing tables derived from it (``ExpertMap``), owned in one place.

The MoE forward (``moe.py``), both dispatch paths (``ep_dispatch.py``), the expert-load counter
(``load_counter.py``) and the expert mover (``stages/expert_mover.py``) all read the layer's ``ExpertMap``;
a new placement is written once, by ``ExpertMap.update``, into the same tensors (so captured CUDA graphs
read the new tables at their next replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeserve.experts.placement import expert_placement


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical experts this rank holds, in physical-slot order (``phy2log``).

    ``all_ranks``, when known, is the whole placement (every EP rank's slots; ``rank`` is this one). A hot
    expert may then have copies on several ranks: each of a token's pairs with it is served by one copy,
    chosen by token index (``pick_owner``, the rule both dispatch paths use), so that each pair is served
    once."""

    num_logical: int
    local_logical_ids: tuple[int, ...]
    rank: int = 0
    all_ranks: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_ranks(cls, per_rank: list[list[int]], rank: int, num_logical: int | None = None) -> ExpertPlacement:
        """Rank ``rank``'s share of a whole placement (logical expert ids per EP rank)."""
        num_logical = num_logical or 1 + max(e for ids in per_rank for e in ids)
        return cls(num_logical, tuple(per_rank[rank]), rank, tuple(tuple(ids) for ids in per_rank))

    @classmethod
    def all_local(cls, num_experts: int) -> ExpertPlacement:
        return cls(num_experts, tuple(range(num_experts)))

    @classmethod
    def contiguous(cls, num_experts: int, ep_rank: int, ep_size: int) -> ExpertPlacement:
        """Rank ``ep_rank``'s share of the default placement (the one ``moeserve plan`` prints)."""
        return cls.from_ranks(expert_placement(num_experts, ep_size), ep_rank)

    @property
    def num_local(self) -> int:
        return len(self.local_logical_ids)

    @property
    def num_ranks(self) -> int:
        return len(self.all_ranks) or 1

    def log2local(self) -> torch.Tensor:
        """[num_logical] -> local slot, or ``num_local`` (a sentinel) for experts held elsewhere."""
        table = torch.full((self.num_logical,), self.num_local, dtype=torch.long)
        for slot, log_id in enumerate(self.local_logical_ids):
            table[log_id] = slot
        return table

    @property
    def has_copies(self) -> bool:
        """Whether some logical expert sits on several ranks (known only with the whole placement)."""
        held = [e for ids in self.all_ranks for e in ids]
        return len(held) > len(set(held))

    def phy2log(self) -> torch.Tensor | None:
        """[ep, slots] the whole placement (None when only this rank's share is known)."""
        return torch.tensor(self.all_ranks, dtype=torch.long) if self.all_ranks else None

    def holders(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``holder_table`` of the whole placement (None when only this rank's share is known)."""
        phy2log = self.phy2log()
        return None if phy2log is None else holder_table(phy2log, self.num_logical)


def holder_table(phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log: [ep, slots] logical expert in each physical slot -> (holders [num_logical, ep]: each row
    starts with the ranks holding that expert, ascending; num_copies [num_logical])."""
    ep = phy2log.shape[0]
    holds = torch.zeros(num_logical, ep, dtype=torch.bool, device=phy2log.device)
    holds[phy2log, torch.arange(ep, device=phy2log.device).unsqueeze(1).expand_as(phy2log)] = True
    num_copies = holds.sum(1)
    if num_copies.device.type != "meta" and bool((num_copies == 0).any()):
        raise ValueError("every logical expert must be held by some rank of the EP group")
    holders = torch.argsort((~holds).to(torch.int8), dim=1, stable=True)
    return holders, num_copies


def slot_table(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """phy2log: [ep, slots] -> [num_logical, ep] the physical slot (``rank * slots + slot``) of expert e on
    rank r (0 where r does not hold e: ``pick_owner`` never picks it)."""
    ep, slots = phy2log.shape
    table = torch.zeros(num_logical, ep, dtype=torch.long, device=phy2log.device)
    ranks = torch.arange(ep, device=phy2log.device).unsqueeze(1).expand_as(phy2log)
    table[phy2log, ranks] = ranks * slots + torch.arange(slots, device=phy2log.device)
    return table


def pick_owner(expert_ids: torch.Tensor, first_token: int, holders: torch.Tensor,
               num_copies: torch.Tensor) -> torch.Tensor:
    """expert_ids: [T, k] -> [T, k] the rank that runs each pair. Redundant copies of an expert take its
    tokens in turn by global token index (``first_token`` is the index of this share's first token)."""
    token = torch.arange(first_token, first_token + expert_ids.shape[0], device=expert_ids.device)
    copy = token.unsqueeze(1) % num_copies[expert_ids]
    return holders[expert_ids, copy]


class ExpertMap(nn.Module):
    """One MoE layer's placement and its routing tables, as buffers (they follow the layer's device).

    ``log2local`` [num_logical]: the local slot of each expert (``num_local`` where another rank holds it);
    with the whole placement known, ``holders`` / ``num_copies`` (``holder_table``) pick the copy that
    serves each pair and ``slot_of`` [num_logical, ep] gives its physical slot. The tables keep their shapes
    for the layer's life: ``update`` writes a new placement in place."""

    log2local: torch.Tensor
    holders: torch.Tensor | None
    num_copies: torch.Tensor | None
    slot_of: torch.Tensor | None

    def __init__(self, placement: ExpertPlacement):
        super().__init__()
        self.placement = placement
        self.register_buffer("log2local", placement.log2local(), persistent=False)
        holders = placement.holders()
        phy2log = placement.phy2log()
        self.register_buffer("holders", None if holders is None else holders[0], persistent=False)
        self.register_buffer("num_copies", None if holders is None else holders[1], persistent=False)
        self.register_buffer("slot_of", None if phy2log is None else slot_table(phy2log, placement.num_logical),
                             persistent=False)

    @property
    def num_local(self) -> int:
        return self.placement.num_local

    @property
    def num_logical(self) -> int:
        return self.placement.num_logical

    @property
    def rank(self) -> int:
        return self.placement.rank

    @property
    def is_whole(self) -> bool:
        """Whether every rank's slots are known (so copies can be told apart and physical slots counted)."""
        return self.holders is not None

    def owners(self, ids: torch.Tensor, first_token: int) -> torch.Tensor:
        """ids: [T, k] logical experts of tokens ``first_token ..`` -> [T, k] the EP rank serving each pair."""
        assert self.holders is not None and self.num_copies is not None, "the whole placement is not known"
        return pick_owner(ids, first_token, self.holders, self.num_copies)

    def direct_slots(self) -> torch.Tensor | None:
        """The table ``local_slots`` reduces to where no expert has a copy on another rank (``log2local``: a
        pair's slot is ``table[id]``, a lookup the router kernel can make), else None."""
        return self.log2local if self.holders is None else None

    def local_slots(self, ids: torch.Tensor, first_token: int = 0) -> torch.Tensor:
        """[T, k] logical ids -> [T * k] local slot, or ``num_local`` where another rank serves the pair (it
        holds the expert, or holds the copy that this token's index picks)."""
        local = self.log2local[ids.flatten()]
        if self.holders is None:  # only this rank's share known: no expert has a copy elsewhere
            return local
        owner = self.owners(ids, first_token).flatten()
        return torch.where(owner == self.rank, local, self.num_local)

    def slots_here(self, ids: torch.Tensor) -> torch.Tensor:
        """[R, k] logical ids of the pairs sent to this rank (-1: none) -> [R * k] local slot / sentinel."""
        flat = ids.flatten()
        return torch.where(flat >= 0, self.log2local[flat.clamp(min=0)], self.num_local)

    def physical_slots(self, ids: torch.Tensor, first_token: int) -> torch.Tensor:
        """[T, k] -> [T, k] the physical slot (``rank * slots + slot``) serving each pair."""
        assert self.slot_of is not None, "the whole placement is not known"
        return self.slot_of[ids, self.owners(ids, first_token)]

    def gather_whole(self, group: Any) -> None:
        """Learn the other ranks' slots from them (every rank of ``group`` calls it at the same point): for a
        placement given as this rank's share only. All ranks hold the same number of slots."""
        if self.is_whole:
            return
        device = self.log2local.device
        local = torch.tensor(self.placement.local_logical_ids, dtype=torch.long, device=device)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        placement = ExpertPlacement.from_ranks([p.tolist() for p in parts], dist.get_rank(group),
                                               self.num_logical)
        self.placement = placement
        holders, num_copies = holder_table(torch.stack(parts), self.num_logical)
        self.holders, self.num_copies = holders, num_copies
        self.slot_of = slot_table(torch.stack(parts), self.num_logical)

    def update(self, placement: ExpertPlacement) -> None:
        """Route with ``placement`` from now on (the layer's weights must already match its slots): every
        table is written in place."""
        if placement.num_local != self.num_local or placement.num_logical != self.num_logical \
                or (placement.num_ranks if placement.all_ranks else 0) != (0 if self.holders is None
                                                                           else self.holders.shape[1]):
            raise ValueError("a new placement must keep the number of experts, ranks and slots per rank")
        self.placement = placement
        self.log2local.copy_(placement.log2local())
        holders, phy2log = placement.holders(), placement.phy2log()
        if holders is not None and phy2log is not None:
            assert self.holders is not None and self.num_copies is not None and self.slot_of is not None
            self.holders.copy_(holders[0])
            self.num_copies.copy_(holders[1])
            self.slot_of.copy_(slot_table(phy2log, self.num_logical))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, local={list(self.placement.local_logical_ids)}"
