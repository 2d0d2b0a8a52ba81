"""The (token, expert) pairs of a step grouped by local expert, each expert's run padded (``sort_pairs``): for a
decode-sized step in one launch.

Reference: ``sort_pairs``'s tensor-op path, which larger steps still take: counts per expert,
each expert's run padded to ``block_m`` rows, every pair's row in its expert's run, and the expert of each
row block. The tensor ops take about ten launches and a radix sort per MoE layer; here one program does it.
A pair's row inside its expert's run comes from an atomic cursor, so the order of the pairs within a run
varies from run to run; the results do not (every row of the GEMMs is computed alone and written back to
its own pair, and a token's pairs are summed in pair order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.pdl import pdl_args, pdl_enter

MAX_PAIRS = 4096  # larger steps sort with tensor ops


@triton.jit(do_not_specialize=["num_pairs", "max_padded"])
def _align(local_ptr, cursor_ptr, pair_ids_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_local,
           max_padded, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_B: tl.constexpr, BM: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    p = tl.arange(0, BLOCK_P)
    expert = tl.load(local_ptr + p, mask=p < num_pairs, other=num_local)
    held = expert < num_local
    counts = tl.histogram(tl.where(held, expert, BLOCK_E - 1).to(tl.int32), BLOCK_E)  # the last bin: the rest
    e = tl.arange(0, BLOCK_E)
    counts = tl.where(e < num_local, counts, 0)
    padded = (counts + BM - 1) // BM * BM
    end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + e, end - padded)  # each run's first row
    tl.store(cursor_ptr + BLOCK_E + e, end)
    tl.store(num_padded_ptr, tl.max(end, 0))
    rows = tl.arange(0, BLOCK_R)
    tl.store(pair_ids_ptr + rows, num_pairs, mask=rows < max_padded)  # padding rows
    tl.debug_barrier()
    dest = tl.atomic_add(cursor_ptr + expert, tl.full([BLOCK_P], 1, tl.int64), mask=held)
    tl.store(pair_ids_ptr + dest, p, mask=held)
    # a block's expert: the number of runs that end at or before the block's first row (runs are in expert
    # order, empty ones end where the one before did); blocks past the last run are never read
    for c in range(0, BLOCK_B, 32):
        blocks = c + tl.arange(0, 32)
        first = blocks * BM
        owner = tl.sum((end[None, :] <= first[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.minimum(owner, num_local - 1), mask=first < max_padded)


def padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the sorted pair list: every pair, and each expert's run padded to ``block_m`` rows."""
    return triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m


def align_pairs(local: torch.Tensor, num_local: int, block_m: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sort_pairs``'s (pair_ids [max_padded], block_expert [max_padded // block_m], num_padded [1]) for
    at most ``MAX_PAIRS`` pairs; local: [P] int64 local slot of each pair, ``num_local`` = served elsewhere."""
    num_pairs = local.numel()
    assert num_pairs <= MAX_PAIRS
    max_padded = padded_rows(num_pairs, num_local, block_m)
    block_e = triton.next_power_of_2(num_local + 1)
    device = local.device
    cursor = torch.empty(2 * block_e, dtype=torch.int64, device=device)
    pair_ids = torch.empty(max_padded, dtype=torch.int64, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int64, device=device)
    num_padded = torch.empty(1, dtype=torch.int64, device=device)
    _align[(1,)](local, cursor, pair_ids, block_expert, num_padded, num_pairs, num_local, max_padded,
                 BLOCK_P=triton.next_power_of_2(max(num_pairs, 16)), BLOCK_E=block_e,
                 BLOCK_R=triton.next_power_of_2(max_padded), BLOCK_B=max(32, triton.next_power_of_2(max_padded // block_m)),
                 BM=block_m, num_warps=8, **pdl_args(local.device))
    return pair_ids, block_expert, num_padded


@dataclass
class SortedPairs:
    """(token, expert) pairs grouped by local expert, each expert's run padded to ``block_m`` rows."""

    pair_ids: torch.Tensor  # [max_padded] pair index (token * top_k + k) per row; num_pairs marks padding
    block_expert: torch.Tensor  # [max_padded // block_m] local expert of each row block
    num_padded: torch.Tensor  # [1] rows in use (blocks past it are skipped)
    block_m: int


def sort_pairs(local: torch.Tensor, num_local: int, block_m: int) -> SortedPairs:
    """local: [P] local expert slot of each pair (``num_local`` for pairs served elsewhere) -> the pairs
    sorted by expert with padded runs. Fixed shapes, no host synchronisation."""
    num_pairs = local.numel()
    if num_pairs <= MAX_PAIRS:  # decode-sized steps: one launch (align_pairs)
        return SortedPairs(*align_pairs(local, num_local, block_m), block_m)
    device = local.device
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=device)
    counts.index_add_(0, local, torch.ones_like(local))
    counts = counts[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [E]
    start = padded_end - padded
    run_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(local, stable=True)
    sorted_local = local[order]
    held = sorted_local < num_local
    expert = sorted_local.clamp(max=num_local - 1)
    dest = start[expert] + torch.arange(num_pairs, device=device) - run_start[expert]
    max_padded = padded_rows(num_pairs, num_local, block_m)
    pair_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.long, device=device)
    # pairs served elsewhere are written to the spare last row, which no block reads
    pair_ids.index_copy_(0, torch.where(held, dest, max_padded), order)
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp(max=num_local - 1)
    return SortedPairs(pair_ids[:max_padded], block_expert, padded_end[-1:], block_m)
