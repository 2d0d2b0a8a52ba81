"""The MoE router after its matmul in one kernel: scores, group-limited selection, top-k, normalisation; and the
matmul itself for one-token steps (``router_logits_few``; ``norm_router_logits`` with the layer's residual add
and RMSNorm before it in the same launch).

Reference: ``route`` (``moeserve/experts/gate.py``): softmax (V2) or sigmoid (V3) scores; top-k that is
greedy, group-limited greedy (groups ranked by their best score) or ``noaux_tc`` (groups ranked by the sum
of their two best biased scores; the bias picks experts but does not weigh them); optional normalisation of
the top-k weights; the routed scaling factor. One program per token; selections are repeated arg-maxes, so
among exactly equal scores the lowest index wins (the eager ``topk`` leaves that order unspecified).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.experts.gate import GateSpec
from moeserve.kernels.pdl import pdl_args, pdl_enter
from moeserve.kernels.rmsnorm import normed_row

METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


@triton.jit(do_not_specialize=["share_lo", "share_hi"])
def _route(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_l, E: tl.constexpr, BLOCK_E: tl.constexpr,
           TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr,
           METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, scaling,
           count_ptr, count_weight_ptr, num_decode_ptr, share_lo, share_hi, COUNT: tl.constexpr,
           HAS_COUNT_WEIGHT: tl.constexpr, slot_map_ptr, slots_ptr, HAS_SLOTS: tl.constexpr,
           PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    x = tl.load(logits_ptr + t * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.where(ok, 1.0 / (1.0 + tl.exp(-x)), float("-inf"))
    else:
        p = tl.exp(x - tl.max(x, 0))
        scores = tl.where(ok, p / tl.sum(p, 0), float("-inf"))
    choice = scores
    if HAS_BIAS:
        choice = tl.where(ok, scores + tl.load(bias_ptr + e, mask=ok, other=0.0), float("-inf"))
    if METHOD != 0:  # keep the TOPK_GROUP best groups of E // N_GROUP experts
        group = e // (E // N_GROUP)
        keep = tl.zeros([BLOCK_E], tl.int1)
        group_score = tl.zeros([BLOCK_E], tl.float32)  # every expert carries its group's score
        for g in range(N_GROUP):
            in_g = (group == g) & ok
            vals = tl.where(in_g, choice, float("-inf"))
            best = tl.max(vals, 0)
            if METHOD == 2:  # the sum of the group's two best
                first = tl.argmax(vals, 0)
                best = best + tl.max(tl.where(e == first, float("-inf"), vals), 0)
            group_score = tl.where(in_g, best, group_score)
        for _ in range(TOPK_GROUP):  # the best group not yet kept (its lowest expert index breaks ties)
            first_e = tl.argmax(tl.where(keep | ~ok, float("-inf"), group_score), 0)
            keep = keep | (group == (first_e // (E // N_GROUP)))
        choice = tl.where(keep, choice, float("-inf") if METHOD == 2 else 0.0)
        choice = tl.where(ok, choice, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    w_all = tl.zeros([BLOCK_K], tl.float32)
    id_all = tl.zeros([BLOCK_K], tl.int64)
    for k in range(TOP_K):
        idx = tl.argmax(choice, 0)
        # group-limited greedy weighs by the masked scores (0 outside the groups), the others by the scores
        w = tl.sum(tl.where(e == idx, choice if METHOD == 1 else scores, 0.0), 0)
        w_all = tl.where(kk == k, w, w_all)
        id_all = tl.where(kk == k, idx.to(tl.int64), id_all)
        choice = tl.where(e == idx, float("-inf"), choice)
    if NORM:
        w_all = w_all / (tl.sum(w_all, 0) + 1e-20)
    tl.store(ids_ptr + t * TOP_K + kk, id_all, mask=kk < TOP_K)
    tl.store(weights_ptr + t * TOP_K + kk, w_all * scaling, mask=kk < TOP_K)
    if HAS_SLOTS:  # each pair's local slot (ExpertMap.local_slots where it is one lookup)
        tl.store(slots_ptr + t * TOP_K + kk, tl.load(slot_map_ptr + id_all, mask=kk < TOP_K), mask=kk < TOP_K)
    if COUNT:  # the expert-load counter's logical counts of this layer: [2 (prefill, decode), E]
        mine = (t >= share_lo) & (t < share_hi)
        phase = tl.where(t < tl.load(num_decode_ptr), 1, 0).to(tl.int64)
        if HAS_COUNT_WEIGHT:
            one = tl.zeros([BLOCK_K], tl.int64) + tl.load(count_weight_ptr + t).to(tl.int64)
        else:
            one = tl.full([BLOCK_K], 1, tl.int64)
        tl.atomic_add(count_ptr + phase * E + id_all, one, mask=kk < tl.where(mine, TOP_K, 0))


@triton.jit
def _logits(x_ptr, w_ptr, out_ptr, E, H, stride_x, stride_w, stride_o, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr,
            eps, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr = False):
    """One token's logits of BLOCK_E experts: float32 products of its row (any float dtype) and the float32
    router weight, summed in float32. NORM: the row is first ``x + residual`` normalised as
    ``kernels/rmsnorm.py``'s ``_rms_norm`` does it (its ``normed_row``, the whole row in one block);
    each token's first program also writes the normalised row and the sum (the MoE layer's input and the
    residual stream)."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    acc = tl.zeros([BLOCK_E], tl.float32)
    if NORM:
        h = tl.arange(0, BLOCK_H)
        h_ok = h < H
        dtype = x_ptr.dtype.element_ty
        total = (tl.load(x_ptr + t * H + h, mask=h_ok, other=0.0).to(tl.float32)
                 + tl.load(res_ptr + t * H + h, mask=h_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        norm_w = tl.load(norm_w_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
        y = normed_row(total, norm_w, H, eps, dtype).to(normed_ptr.dtype.element_ty)
        if tl.program_id(1) == 0:
            tl.store(res_out_ptr + t * H + h, total.to(dtype), mask=h_ok)
            tl.store(normed_ptr + t * H + h, y, mask=h_ok)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_w + h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                    other=0.0)
        acc += tl.sum(w * y.to(tl.float32)[None, :], 1)
    else:
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_ok = h < H
            x = tl.load(x_ptr + t * stride_x + h, mask=h_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_w + h[None, :],
                        mask=e_ok[:, None] & h_ok[None, :], other=0.0)
            acc += tl.sum(w * x[None, :], 1)
    tl.store(out_ptr + t * stride_o + e, acc, mask=e_ok)


def router_logits_few(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gate.router_logits``'s float32 path for a few tokens in one launch: x [T, H] (bf16 or any float), weight
    [E, H] float32 -> [T, E] float32, without the cast of x to float32 and cuBLAS's float32 product (two
    launches, 4.6 us of a V2-Lite layer at one token on an H200). Sums in another order than cuBLAS: the logits
    agree to float32 rounding. One expert a program, its whole row loaded in one or two steps: the launch is
    latency-bound (four experts a program in two steps of 1,024 took 6.2 us a V2-Lite layer on an H100)."""
    tokens, hidden = x.shape
    experts = weight.shape[0]
    assert weight.dtype == torch.float32 and weight.shape[1] == hidden and weight.stride(1) == 1 and x.stride(1) == 1
    out = torch.empty(tokens, experts, dtype=torch.float32, device=x.device)
    if tokens:
        _logits[(tokens, experts)](x, weight, out, experts, hidden, x.stride(0), weight.stride(0), out.stride(0),
                                   x, x, x, x, 0.0, BLOCK_E=1, BLOCK_H=min(4096, triton.next_power_of_2(hidden)),
                                   NORM=False, num_warps=4, **pdl_args(x.device))
    return out


def norm_router_logits(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add and RMSNorm before a MoE layer (``kernels.rmsnorm.rms_norm(x, norm_weight, eps,
    residual)``, the same steps and roundings) and ``router_logits_few`` of its output, in one launch: x,
    residual [T, H] contiguous; norm_weight [H]; weight [E, H] float32 -> (the normalised rows [T, H], x +
    residual [T, H], the float32 logits [T, E]). For one-token steps, where the norm's own launch costs as much
    as its work."""
    tokens, hidden = x.shape
    experts = weight.shape[0]
    assert weight.dtype == torch.float32 and weight.shape[1] == hidden and weight.stride(1) == 1
    assert x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape
    normed = torch.empty(tokens, hidden, dtype=torch.promote_types(x.dtype, norm_weight.dtype), device=x.device)
    total = torch.empty_like(x)
    out = torch.empty(tokens, experts, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(hidden)
    if tokens:
        _logits[(tokens, experts)](x, weight, out, experts, hidden, x.stride(0), weight.stride(0), out.stride(0),
                                   residual, norm_weight, normed, total, eps, BLOCK_E=1, BLOCK_H=block, NORM=True,
                                   num_warps=min(8, max(1, block // 256)), **pdl_args(x.device))
    return normed, total, out


def fused_route(logits: torch.Tensor, spec: GateSpec, bias: torch.Tensor | None = None,
                count: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int] | None = None,
                slot_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``route``'s contract: logits [T, E] float32 -> (weights [T, top_k] float32, ids [T, top_k] int64,
    slots [T * top_k] or None).

    ``count``: (counts [2, E] int64 of one layer, num_decode_tokens as a device scalar, weights [>= T] or
    None, first, last): each pair of the tokens [first, last) also adds its token's weight to its expert's
    count in the token's phase, in the same launch (``ExpertLoadCounter.count``'s logical counts).
    ``slot_map``: [E] a table (``ExpertMap.direct_slots``): each pair's ``slot_map[id]`` is written to slots."""
    tokens, experts = logits.shape
    weights = torch.empty(tokens, spec.top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, spec.top_k, dtype=torch.long, device=logits.device)
    slots = torch.empty(tokens * spec.top_k, dtype=slot_map.dtype, device=logits.device) \
        if slot_map is not None else None
    method = METHODS[spec.topk_method]
    counts, num_decode, count_weights, lo, hi = count or (logits, logits, None, 0, 0)
    if tokens:
        _route[(tokens,)](logits, bias if bias is not None else logits, weights, ids, logits.stride(0),
                          E=experts, BLOCK_E=triton.next_power_of_2(experts), TOP_K=spec.top_k,
                          BLOCK_K=triton.next_power_of_2(spec.top_k),
                          N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, SIGMOID=spec.scoring_func != "softmax",
                          METHOD=method, HAS_BIAS=bias is not None and method == 2,
                          NORM=spec.norm_topk_prob and spec.top_k > 1, scaling=spec.routed_scaling_factor,
                          count_ptr=counts, count_weight_ptr=logits if count_weights is None else count_weights,
                          num_decode_ptr=num_decode, share_lo=lo, share_hi=hi, COUNT=count is not None,
                          HAS_COUNT_WEIGHT=count_weights is not None,
                          slot_map_ptr=slot_map if slot_map is not None else ids,
                          slots_ptr=slots if slots is not None else ids, HAS_SLOTS=slots is not None,
                          num_warps=1 if experts <= 64 else 4, **pdl_args(logits.device))
    return weights, ids, slots
