"""How a MoE layer's routed pairs reach the experts that serve them and come back: the dispatch step of
``MoE.forward`` (route -> dispatch -> experts -> combine), one object per layer.

``ReduceDispatch`` (``dispatch="allreduce"``; also one rank, and tensor-parallel experts): every rank of
the group routes all T tokens, runs the pairs it serves (``ExpertMap.local_slots``) and one all-reduce sums
the routed partials with the shared experts' tensor-parallel partials.

``AllToAllDispatch`` (``dispatch="alltoall"``): the ranks of a stage all hold the same T tokens (attention
is tensor-parallel). Each rank takes its 1/ep share of them, routes the share, sends each token to the ranks
that serve its pairs (``comm/alltoall.py``), runs the rows it receives through its own experts and sends the
results back. One all-reduce then sums the shared experts' partials and gathers the routed token shares, so
every rank leaves with the full [T, H]. With every rank holding all tokens this moves more bytes than the
all-reduce path; it is the building block for attention data parallelism, where each rank holds different
tokens and only its own are dispatched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.comm.alltoall import DispatchLayout, all_gather_rows, combine, dispatch
from moeserve.comm.shard import ShardInfo
from moeserve.experts.expert_map import ExpertMap, holder_table, pick_owner  # noqa: F401 - re-exported

DISPATCH_MODES = ("allreduce", "alltoall")


def check_dispatch(dispatch: str, expert_tp: bool) -> str:
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"MoE dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
    if dispatch == "alltoall" and expert_tp:
        raise ValueError("alltoall dispatch needs the routed experts spread over the ranks (ep == tp), "
                         "not tensor-parallel experts (ep == 1)")
    return dispatch


def token_shares(num_tokens: int, ep: int) -> list[int]:
    """Tokens per rank, as even as possible: the first ``num_tokens % ep`` ranks take one more."""
    base, extra = divmod(num_tokens, ep)
    return [base + (r < extra) for r in range(ep)]


@dataclass(frozen=True)
class Rows:
    """What this rank's experts run: ``x`` [R, H] rows, ``weights`` [R, k] and ``slots`` [R * k] the local
    slot of each pair (``num_local``: not served here). ``layout`` (all-to-all only) brings them back;
    ``peer_counts`` (all-to-all only) [num_logical] every rank's routed pairs per expert."""

    x: torch.Tensor
    weights: torch.Tensor
    slots: torch.Tensor
    layout: DispatchLayout | None = None
    peer_counts: torch.Tensor | None = None


class ReduceDispatch:
    """Every rank routes every token; each serves its own pairs; one all-reduce adds them up."""

    routes_all = True

    def __init__(self, expert_map: ExpertMap, shard: ShardInfo):
        self.map, self.shard = expert_map, shard

    def share(self, num_tokens: int) -> tuple[int, int]:
        """(first token, number of tokens) this rank routes."""
        return 0, num_tokens

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, first_token: int,
                 slots: torch.Tensor | None = None) -> Rows:
        """``slots``: the pairs' local slots where the router kernel looked them up (``ExpertMap.direct_slots``)."""
        return Rows(x, weights, self.map.local_slots(ids, first_token) if slots is None else slots)

    def combine(self, y: torch.Tensor, rows: Rows) -> torch.Tensor:
        return y

    def finish(self, x: torch.Tensor, routed: torch.Tensor, first_token: int,
               shared: torch.Tensor | None) -> torch.Tensor:
        """The layer's output [T, H], the same on every rank of the group."""
        return self.shard.all_reduce(routed if shared is None else routed + shared)


class AllToAllDispatch:
    """Each rank routes its share of the tokens and sends every pair to the rank that serves it."""

    routes_all = False

    def __init__(self, expert_map: ExpertMap, shard: ShardInfo):
        self.map, self.shard = expert_map, shard

    def share(self, num_tokens: int) -> tuple[int, int]:
        counts = token_shares(num_tokens, self.shard.size)
        return sum(counts[:self.shard.rank]), counts[self.shard.rank]

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, first_token: int,
                 slots: torch.Tensor | None = None) -> Rows:
        """x: this rank's share [T_share, H] -> the rows sent here by every rank (itself included). ``slots``
        must be None: the slots are those of the rows received."""
        assert slots is None, "an all-to-all dispatch looks up the slots of the rows it receives"
        # NOTE: a map given only this rank's share gathers the others' at the first forward (every rank of
        # the group runs the same layers, so they all arrive here together)
        self.map.gather_whole(self.shard.group)
        dest = self.map.owners(ids, first_token)
        histogram = torch.bincount(ids.flatten(), minlength=self.map.num_logical)
        got = dispatch(x, dest, ids, weights, self.shard.group, stats=histogram)
        assert got.peer_stats is not None
        return Rows(got.x, got.weights, self.map.slots_here(got.expert_ids), got.layout, got.peer_stats.sum(0))

    def combine(self, y: torch.Tensor, rows: Rows) -> torch.Tensor:
        """y: [R, H] results of the received rows -> [T_share, H] this rank's share, back in token order."""
        assert rows.layout is not None
        return combine(y, rows.layout, self.shard.group)

    def finish(self, x: torch.Tensor, routed: torch.Tensor, first_token: int,
               shared: torch.Tensor | None) -> torch.Tensor:
        if shared is None:
            return all_gather_rows(routed, token_shares(x.shape[0], self.shard.size), self.shard.group)
        # NOTE: one all-reduce both sums the shared experts' tensor-parallel partials and gathers the routed
        # shares (each rank adds zeros outside its rows): the bytes of reduce-scatter + all-gather, one call.
        shared[first_token:first_token + routed.shape[0]] += routed
        return self.shard.all_reduce(shared)


Dispatch = ReduceDispatch | AllToAllDispatch


def make_dispatch(mode: str, expert_map: ExpertMap, shard: ShardInfo) -> Dispatch:
    if mode == "alltoall" and shard.size > 1:
        return AllToAllDispatch(expert_map, shard)
    return ReduceDispatch(expert_map, shard)
