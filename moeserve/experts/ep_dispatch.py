"""The expert-parallel MoE forward by all-to-all (``MoE(dispatch="alltoall")``).

The ranks of a stage all hold the same T tokens (attention is tensor-parallel). Each rank takes its 1/ep
share of them, routes the share, sends each token to the ranks that own its experts (``comm/alltoall.py``),
runs the rows it receives through its own experts -- with MoE's own expert compute, so the grouped-GEMM and
any quantized path apply -- and sends the results back. One all-reduce then sums the shared experts'
tensor-parallel partials and gathers the routed token shares, so every rank leaves with the full [T, H] and
the rest of the model is unchanged.

With every rank holding all tokens this moves more bytes than the all-reduce path; it is the building block
for attention data parallelism, where each rank holds different tokens and only its own are dispatched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moeserve.comm.alltoall import Dispatched, all_gather_rows, combine, dispatch
from moeserve.comm.shard import ShardInfo
from moeserve.experts.gate import route, router_logits

if TYPE_CHECKING:
    from moeserve.experts.moe import ExpertPlacement, MoE

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


def holder_table(phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log: [ep, slots] logical expert in each physical slot -> (holders [num_logical, ep]: each row
    starts with the ranks holding that expert, ascending; num_copies [num_logical])."""
    ep = phy2log.shape[0]
    holds = torch.zeros(num_logical, ep, dtype=torch.bool, device=phy2log.device)
    holds[phy2log, torch.arange(ep, device=phy2log.device).unsqueeze(1).expand_as(phy2log)] = True
    num_copies = holds.sum(1)
    if bool((num_copies == 0).any()):
        raise ValueError("every logical expert must be held by some rank of the EP group")
    holders = torch.argsort((~holds).to(torch.int8), dim=1, stable=True)
    return holders, num_copies


def pick_owner(expert_ids: torch.Tensor, first_token: int, holders: torch.Tensor,
               num_copies: torch.Tensor) -> torch.Tensor:
    """expert_ids: [T, k] -> [T, k] the rank that runs each pair. Redundant copies of an expert take its
    tokens in turn by global token index (``first_token`` is the index of this share's first token)."""
    token = torch.arange(first_token, first_token + expert_ids.shape[0], device=expert_ids.device)
    copy = token.unsqueeze(1) % num_copies[expert_ids]
    return holders[expert_ids, copy]


class AllToAllDispatch:
    """The all-to-all path of one MoE layer: its EP group and, after the first call, the expert holders.

    Not an ``nn.Module``: it holds no weights; the MoE passes itself to ``forward``.
    """

    def __init__(self, placement: ExpertPlacement, shard: ShardInfo):
        self.placement = placement
        self.shard = shard
        self._holders: tuple[torch.Tensor, torch.Tensor] | None = None

    def holders(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: a placement built from the whole layout (``ExpertPlacement.from_ranks``, as the workers do)
        # knows every rank's slots. One given only its own share gathers the others' at the first forward
        # (every rank of the group runs the same layers, so they all arrive here together). All ranks hold
        # the same number of slots (``check_placement``), as all_gather needs.
        if self._holders is None:
            table = self.placement.holders()
            if table is not None:
                self._holders = table[0].to(device), table[1].to(device)
        if self._holders is None:
            local = torch.tensor(self.placement.local_logical_ids, dtype=torch.long, device=device)
            parts = [torch.empty_like(local) for _ in range(self.shard.size)]
            dist.all_gather(parts, local, group=self.shard.group)
            self._holders = holder_table(torch.stack(parts), self.placement.num_logical)
        return self._holders

    def forward(self, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden], the same on every rank of the group -> [T, hidden], the same on every rank.

        ``moe.tokens_per_expert`` counts all T tokens, as on the all-reduce path; ``moe.last_expert_ids``
        is this rank's share only ([T_share, top_k]).
        """
        if x.shape[0] == 0:  # the same on every rank: nothing to exchange
            return x.new_zeros(x.shape)
        counts = token_shares(x.shape[0], self.shard.size)
        start = sum(counts[:self.shard.rank])
        share = x[start:start + counts[self.shard.rank]]
        weights, ids = self.route(moe, share)
        moe.last_expert_ids = ids
        if moe.load_counter is not None:
            moe.load_counter.count(moe.layer_id, ids, start)
        dest = pick_owner(ids, start, *self.holders(x.device))
        histogram = torch.bincount(ids.flatten(), minlength=moe.spec.num_experts)
        got = dispatch(share, dest, ids, weights, self.shard.group, stats=histogram)
        assert got.peer_stats is not None
        moe.tokens_per_expert += got.peer_stats.sum(0).to(moe.tokens_per_expert)
        routed = combine(self.run_experts(moe, got), got.layout, self.shard.group)  # [T_share, H]
        if moe.shared_experts is None:
            return all_gather_rows(routed, counts, self.shard.group)
        # NOTE: one all-reduce both sums the shared experts' tensor-parallel partials and gathers the routed
        # shares (each rank adds zeros outside its rows): the bytes of reduce-scatter + all-gather, one call.
        out = moe.shared_experts(x)
        out[start:start + routed.shape[0]] += routed
        return self.shard.all_reduce(out)

    @staticmethod
    def route(moe: MoE, share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """share: [T_share, H] -> (weights, ids) [T_share, top_k]; an empty share (fewer tokens than ranks)
        skips the router, whose group view cannot take zero rows."""
        if share.shape[0] == 0:
            top_k = moe.spec.top_k
            return share.new_zeros((0, top_k), dtype=torch.float32), share.new_zeros((0, top_k), dtype=torch.long)
        return route(router_logits(share, moe.gate_weight), moe.spec, moe.e_score_correction_bias)

    @staticmethod
    def run_experts(moe: MoE, got: Dispatched) -> torch.Tensor:
        """Received rows [R, H] -> [R, H]: each row's sum over its pairs held here of weight * expert(row)."""
        pair_row, pair_col = (got.expert_ids >= 0).nonzero(as_tuple=True)  # [P]
        if not len(pair_row):
            return torch.zeros_like(got.x)
        ids = got.expert_ids[pair_row, pair_col].unsqueeze(1)  # [P, 1]: one expert per pair row
        weights = got.weights[pair_row, pair_col].unsqueeze(1)
        rows = got.x[pair_row]
        expert_fn = moe.routed_grouped if moe.use_grouped_mm(rows) else moe.routed
        # NOTE: each pair goes to its (row, top-k column) place and a row's columns are summed in a fixed
        # order, not by index_add_, whose atomic adds on GPUs give a bf16 sum that varies from run to run
        pairs = got.x.new_zeros((*got.expert_ids.shape, got.x.shape[-1]))  # [R, top_k, H]
        pairs[pair_row, pair_col] = expert_fn(rows, weights, ids).to(pairs.dtype)
        return pairs.sum(1)
