"""Token dispatch and combine by all-to-all with per-rank row counts (gloo, NCCL, HCCL alike).

A rank sends each of its token rows once to every rank that owns at least one of the token's experts (not
once per expert), with the token's expert ids and routing weights masked to that rank's share. Per MoE layer
four ``all_to_all_single`` calls leave a rank: the counts, the rows, their routing metadata, and the expert
outputs on the way back. All run on the caller's process group, so they fail after that group's timeout
(``comm/groups.py``) instead of hanging on a dead peer.

Shapes: T local tokens, k experts per token, S rows sent, R rows received, H hidden size, ep ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DispatchLayout:
    """How the rows left this rank; ``combine`` uses it to bring the results back in token order."""

    src_token: torch.Tensor  # [S] local token of each sent row; rows grouped by destination rank
    send_counts: list[int]  # [ep] rows sent to each rank
    recv_counts: list[int]  # [ep] rows received from each rank
    num_tokens: int


@dataclass(frozen=True)
class Dispatched:
    """What arrived: rows grouped by source rank, each with the expert pairs it carries for this rank."""

    x: torch.Tensor  # [R, H]
    expert_ids: torch.Tensor  # [R, k] int64 logical expert ids to run here; -1 where the pair went elsewhere
    weights: torch.Tensor  # [R, k] float32 routing weights; 0 where masked
    layout: DispatchLayout
    peer_stats: torch.Tensor | None  # [ep, m] int64: the ``stats`` row each rank sent along with its counts


def exchange_counts(counts: torch.Tensor, group: Any) -> torch.Tensor:
    """counts: [ep, m] integers, row d meant for rank d -> [ep, m], row s received from rank s."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def all_to_all_rows(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group: Any) -> torch.Tensor:
    """rows: [S, ...] grouped by destination (``send_counts[d]`` rows for rank d) -> [R, ...] grouped by
    source (``recv_counts[s]`` rows from rank s)."""
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return out


def rows_by_rank(dest_rank: torch.Tensor, ep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dest_rank: [T, k] owning rank of each (token, expert) pair -> one row per distinct (token, rank):
    (src_token [S], row_rank [S], send_counts [ep]), rows sorted by rank, then by token."""
    num_tokens = dest_rank.shape[0]
    hit = torch.zeros(num_tokens, ep, dtype=torch.bool, device=dest_rank.device)
    hit.scatter_(1, dest_rank, True)  # [T, ep]: does the token go to this rank at all
    row_rank, src_token = hit.t().nonzero(as_tuple=True)  # rank-major: grouped by destination
    return src_token, row_rank, hit.sum(0)


def dispatch(x: torch.Tensor, dest_rank: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             group: Any, stats: torch.Tensor | None = None) -> Dispatched:
    """Send token rows to the ranks that own their experts.

    x: [T, H]; dest_rank, expert_ids, weights: [T, k] (the owning rank, logical id and routing weight of each
    pair). ``stats`` ([m] int64, optional) rides along with the counts to every rank, e.g. this rank's
    per-expert token histogram. ``dest_rank`` values must lie in ``0 .. ep - 1`` of ``group``.
    """
    ep = dist.get_world_size(group)
    top_k = expert_ids.shape[1]
    src_token, row_rank, send_counts = rows_by_rank(dest_rank, ep)
    mine = dest_rank[src_token] == row_rank.unsqueeze(1)  # [S, k]: the pairs each row carries
    ids = torch.where(mine, expert_ids[src_token], -1).to(torch.int32)
    w = torch.where(mine, weights[src_token].float(), 0.0)
    counts = send_counts.unsqueeze(1)
    if stats is not None:
        counts = torch.cat([counts, stats.to(counts).unsqueeze(0).expand(ep, -1)], dim=1)
    peer = exchange_counts(counts, group)  # [ep, 1 + m]
    # NOTE: split sizes must be host integers: this is the one host sync of the dispatch
    send_list, recv_list = send_counts.tolist(), peer[:, 0].tolist()
    meta = torch.cat([ids, w.view(torch.int32)], dim=1)  # [S, 2k]: ids and weight bits in one message
    recv_x = all_to_all_rows(x[src_token], send_list, recv_list, group)
    recv_meta = all_to_all_rows(meta, send_list, recv_list, group)
    layout = DispatchLayout(src_token, send_list, recv_list, x.shape[0])
    return Dispatched(recv_x, recv_meta[:, :top_k].long(), recv_meta[:, top_k:].contiguous().view(torch.float32),
                      layout, None if stats is None else peer[:, 1:])


def combine(y: torch.Tensor, layout: DispatchLayout, group: Any) -> torch.Tensor:
    """y: [R, H] the (already weighted) expert output of each received row -> [T, H] on the source rank,
    each token the sum of the rows it sent out (zero for a token that went nowhere)."""
    back = all_to_all_rows(y, layout.recv_counts, layout.send_counts, group)  # [S, H] in send order
    out = y.new_zeros((layout.num_tokens, *y.shape[1:]))
    # NOTE: one add per destination rank, in rank order: within a rank's rows every token appears at most
    # once, so no add collides, and the sum's order (so its bf16 result on GPUs) is the same on every run
    start = 0
    for count in layout.send_counts:
        if count:
            out.index_add_(0, layout.src_token[start:start + count], back[start:start + count])
        start += count
    return out


def all_gather_rows(share: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
    """share: [counts[rank], ...] -> [sum(counts), ...], the ranks' shares in rank order.

    Shares are padded to the largest for the collective (NCCL wants equal sizes)."""
    width = max(counts)
    padded = share.new_zeros((width, *share.shape[1:]))
    padded[:share.shape[0]] = share
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
