"""A MoE layer's routed pairs added to the expert-load counters in one launch.

Reference: ``ExpertLoadCounter.count`` (``moeserve/experts/load_counter.py``, the eager path): each pair
(token, k) adds its token's weight (1, or 0 for a CUDA graph's padding rows) to the count of its expert in
the token's phase (decode for the step's first ``num_decode_tokens`` tokens, prefill after), and, where the
rank has an expert placement, to the count of the physical slot that serves it. The eager path takes about
eight small launches per layer; inside a captured decode step each costs a few microseconds. Integer atomics:
the counts are exact whatever the order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # pairs per program


@triton.jit(do_not_specialize=["num_pairs", "first_token"])
def _count(ids_ptr, slot_ptr, weight_ptr, num_decode_ptr, logical_ptr, physical_ptr, num_pairs, first_token,
           layer, num_logical, num_physical, TOP_K: tl.constexpr, HAS_WEIGHT: tl.constexpr,
           HAS_SLOT: tl.constexpr, BLOCK: tl.constexpr):
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pair < num_pairs
    row = pair // TOP_K
    phase = tl.where(first_token + row < tl.load(num_decode_ptr), 1, 0).to(tl.int64)  # DECODE = 1
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + row, mask=ok, other=0).to(tl.int64)
    else:
        weight = tl.full([BLOCK], 1, tl.int64)
    ids = tl.load(ids_ptr + pair, mask=ok, other=0)
    tl.atomic_add(logical_ptr + (layer * 2 + phase) * num_logical + ids, weight, mask=ok)
    if HAS_SLOT:
        slot = tl.load(slot_ptr + pair, mask=ok, other=0)
        tl.atomic_add(physical_ptr + (layer * 2 + phase) * num_physical + slot, weight, mask=ok)


def count_pairs(logical: torch.Tensor, physical: torch.Tensor | None, layer: int, ids: torch.Tensor,
                slot: torch.Tensor | None, first_token: int, num_decode_tokens: torch.Tensor,
                weights: torch.Tensor | None) -> None:
    """logical: [layers, 2, num_logical] int64; physical: [layers, 2, num_physical] or None (counted only
    with ``slot``); ids / slot: [N, top_k]; num_decode_tokens: a device scalar; weights: [N] or None."""
    num_pairs = ids.numel()
    if not num_pairs:
        return
    ids = ids.contiguous()
    _count[(triton.cdiv(num_pairs, BLOCK),)](
        ids, ids if slot is None else slot.contiguous(), ids if weights is None else weights, num_decode_tokens,
        logical, logical if physical is None else physical, num_pairs, first_token, layer, logical.shape[-1],
        logical.shape[-1] if physical is None else physical.shape[-1], TOP_K=ids.shape[1],
        HAS_WEIGHT=weights is not None, HAS_SLOT=slot is not None and physical is not None, BLOCK=BLOCK,
        num_warps=4)
