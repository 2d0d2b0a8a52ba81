"""The Triton programs of the split-K MoE path (``kernels/moe_gemv.py`` launches them and says what each
computes): ``_gate_up``, ``_down`` and ``_combine``, and the helpers they share."""

from __future__ import annotations

import triton
import triton.language as tl

from moeserve.kernels.pdl import pdl_enter


@triton.jit
def round_as(x, dtype: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` and back, as an eager op in that dtype would."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _tile_dot(a_row, w_rows, s_row, stride_sk, k_lo, k_hi, row_ok, FP8: tl.constexpr,
              SCALE_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum over k in [k_lo, k_hi) of w[n, k] * a[k] (* scale[k // SCALE_BLOCK]) -> [BLOCK_N] float32."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros_like(row_ok.to(tl.float32))
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_hi
        a = tl.load(a_row + k, mask=k_ok, other=0.0).to(tl.float32)
        if FP8:
            a = a * tl.load(s_row + k // SCALE_BLOCK * stride_sk, mask=k_ok, other=0.0)
        w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], 1)
    return acc


@triton.jit
def _gate_up_dots(a_row, gate_rows, up_rows, s_gate, s_up, stride_sk, k_lo, k_hi, row_ok, FP8: tl.constexpr,
                  SCALE_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_tile_dot`` of the gate rows and of the up rows in one loop (the same sums in the same order): both
    tiles are loaded in the same step, twice the bytes in flight, as Triton does not pipeline loads that feed no
    tensor-core product. -> (gate, up), each [BLOCK_N] float32."""
    ks = tl.arange(0, BLOCK_K)
    gate = tl.zeros_like(row_ok.to(tl.float32))
    up = tl.zeros_like(gate)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_hi
        w_ok = row_ok[:, None] & k_ok[None, :]
        w_gate = tl.load(gate_rows + k[None, :], mask=w_ok, other=0.0)
        w_up = tl.load(up_rows + k[None, :], mask=w_ok, other=0.0)
        a = tl.load(a_row + k, mask=k_ok, other=0.0).to(tl.float32)
        a_gate = a
        a_up = a
        if FP8:
            a_gate = a * tl.load(s_gate + k // SCALE_BLOCK * stride_sk, mask=k_ok, other=0.0)
            a_up = a * tl.load(s_up + k // SCALE_BLOCK * stride_sk, mask=k_ok, other=0.0)
        gate += tl.sum(w_gate.to(tl.float32) * a_gate[None, :], 1)
        up += tl.sum(w_up.to(tl.float32) * a_up[None, :], 1)
    return gate, up


@triton.jit
def _pair_tile(local_ptr, num_local, num_routed, N, K, k_per_split, w_ptr, s_ptr, stride_we, stride_wn, stride_se,
               stride_sn, sh_ptr, sh_piece, sh_stride_n, TOP_K: tl.constexpr, PIECES: tl.constexpr,
               SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's pair, weight rows and reduction range: (pair, token, cols, is_shared, held, row_ok, k_lo,
    k_hi, weight row pointers, scale row pointer). A routed pair served elsewhere reads nothing and writes zeros.
    Pairs from ``num_routed`` on are the shared experts' pieces, ``PIECES`` a token, read from ``sh_ptr``."""
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PIECES > 0:
        expert = tl.load(local_ptr + pair, mask=pair < num_routed, other=0)
    else:
        expert = tl.load(local_ptr + pair)
    held = expert < num_local
    e = tl.where(held, expert, 0).to(tl.int64)
    token = pair // TOP_K
    base = w_ptr + e * stride_we
    stride_n = stride_wn
    is_shared = pair < 0  # false: no shared pieces
    if PIECES > 0:
        is_shared = pair >= num_routed
        piece = tl.maximum(pair - num_routed, 0)
        token = tl.where(is_shared, piece // PIECES, token)
        held = held | is_shared
        base = tl.where(is_shared, sh_ptr + (piece % PIECES).to(tl.int64) * sh_piece, base)
        stride_n = tl.where(is_shared, sh_stride_n, stride_wn)
    row_ok = cols < tl.where(held, N, 0)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = base + cols[:, None].to(tl.int64) * stride_n
    s_row = s_ptr + e * stride_se + (tl.program_id(1) * BLOCK_N // SCALE_BLOCK) * stride_sn
    return pair, token, cols, is_shared, held, row_ok, k_lo, k_hi, w_rows, s_row


@triton.jit(do_not_specialize=["num_pairs", "num_routed"])
def _gate_up(x_ptr, w_ptr, s_ptr, part_ptr, local_ptr, num_local, num_pairs, num_routed, N, K, k_per_split,
             stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_sk, up_scale_offset, sh_ptr, sh_piece,
             sh_stride_n, TOP_K: tl.constexpr, PIECES: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    pair, token, cols, is_shared, held, row_ok, k_lo, k_hi, w_rows, s_row = _pair_tile(
        local_ptr, num_local, num_routed, N, K, k_per_split, w_ptr, s_ptr, stride_we, stride_wn, stride_se,
        stride_sn, sh_ptr, sh_piece, sh_stride_n, TOP_K, PIECES, SCALE_BLOCK, BLOCK_N)
    split = tl.program_id(2)
    a_row = x_ptr + token.to(tl.int64) * stride_x
    # the up rows follow the gate rows: N rows on in a routed expert, all the pieces' gate rows on in the shared.
    # NOTE: without shared pieces the offset stays a product of specialised integers, so that the compiler
    # still knows its alignment and vectorises the loads (a runtime select hides it)
    if PIECES > 0:
        up_rows = w_rows + tl.where(is_shared, PIECES * sh_piece, N * stride_wn)
    else:
        up_rows = w_rows + N * stride_wn
    if PIECES > 0:
        # NOTE: with the shared pieces the up rows' offset is a runtime select, and on one H100 the one-loop form
        # took 8% longer here (V2-Lite at batch 1, profile_decode.py) while it saved time without pieces: two loops
        gate = _tile_dot(a_row, w_rows, s_row, stride_sk, k_lo, k_hi, row_ok, FP8, SCALE_BLOCK, BLOCK_K)
        up = _tile_dot(a_row, up_rows, s_row + up_scale_offset, stride_sk, k_lo, k_hi, row_ok, FP8, SCALE_BLOCK,
                       BLOCK_K)
    else:
        gate, up = _gate_up_dots(a_row, w_rows, up_rows, s_row, s_row + up_scale_offset, stride_sk, k_lo, k_hi,
                                 row_ok, FP8, SCALE_BLOCK, BLOCK_K)
    out = part_ptr + (split * num_pairs + pair).to(tl.int64) * 2 * N + cols
    tl.store(out, gate, mask=cols < N)
    tl.store(out + N, up, mask=cols < N)


@triton.jit
def _activation(part_ptr, pair, k, k_ok, num_pairs, inter, SPLIT_UP: tl.constexpr, dtype: tl.constexpr):
    """silu(gate) * up of ``pair`` at columns ``k``, from the gate/up partials summed in split order."""
    gate = tl.zeros_like(k.to(tl.float32))
    up = tl.zeros_like(k.to(tl.float32))
    for s in range(SPLIT_UP):
        row = part_ptr + (s * num_pairs + pair).to(tl.int64) * 2 * inter
        gate += tl.load(row + k, mask=k_ok, other=0.0)
        up += tl.load(row + inter + k, mask=k_ok, other=0.0)
    gate = round_as(gate, dtype)
    return round_as(round_as(gate / (1.0 + tl.exp(-gate)), dtype) * round_as(up, dtype), dtype)


@triton.jit(do_not_specialize=["num_pairs", "num_routed"])
def _down(part_up_ptr, w_ptr, s_ptr, part_ptr, local_ptr, num_local, num_pairs, num_routed, N, inter, k_per_split,
          stride_we, stride_wn, stride_se, stride_sn, stride_sk, sh_ptr, sh_piece, sh_stride_n, TOP_K: tl.constexpr,
          PIECES: tl.constexpr, SPLIT_UP: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    pair, token, cols, is_shared, held, row_ok, k_lo, k_hi, w_rows, s_row = _pair_tile(
        local_ptr, num_local, num_routed, N, inter, k_per_split, w_ptr, s_ptr, stride_we, stride_wn, stride_se,
        stride_sn, sh_ptr, sh_piece, sh_stride_n, TOP_K, PIECES, SCALE_BLOCK, BLOCK_N)
    split = tl.program_id(2)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + ks
        k_ok = k < tl.where(held, k_hi, 0)
        a = _activation(part_up_ptr, pair, k, k_ok, num_pairs, inter, SPLIT_UP, DTYPE)
        if FP8:
            a = a * tl.load(s_row + k // SCALE_BLOCK * stride_sk, mask=k_ok, other=0.0)
        w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], 1)
    tl.store(part_ptr + (split * num_pairs + pair).to(tl.int64) * N + cols, acc, mask=cols < N)


@triton.jit
def _summed_row(part_ptr, pair, num_pairs, N, cols, ok, SPLIT: tl.constexpr):
    """A pair's output row: its pieces of the reduction summed in split order -> [BLOCK_N] float32."""
    y = tl.zeros(cols.shape, tl.float32)
    for s in range(SPLIT):
        y += tl.load(part_ptr + (s * num_pairs + pair).to(tl.int64) * N + cols, mask=ok, other=0.0)
    return y


@triton.jit(do_not_specialize=["num_pairs", "num_routed"])
def _combine(part_ptr, route_w_ptr, local_ptr, out_ptr, num_local, num_pairs, num_routed, N, stride_o,
             TOP_K: tl.constexpr, PIECES: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
             PDL: tl.constexpr = False):
    pdl_enter(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in range(TOP_K):
        pair = token * TOP_K + j
        y = _summed_row(part_ptr, pair, num_pairs, N, cols, ok, SPLIT)
        w = round_as(tl.load(route_w_ptr + pair), dtype)
        held = tl.load(local_ptr + pair) < num_local
        total += tl.where(held, round_as(round_as(y, dtype) * w, dtype), 0.0)
    if PIECES > 0:  # the shared experts' output, rounded once as one down projection's, added as the eager ops add
        shared = tl.zeros([BLOCK_N], tl.float32)
        for j in range(PIECES):
            shared += _summed_row(part_ptr, num_routed + token * PIECES + j, num_pairs, N, cols, ok, SPLIT)
        total = round_as(total, dtype) + round_as(shared, dtype)
    tl.store(out_ptr + token.to(tl.int64) * stride_o + cols, total.to(dtype), mask=ok)
