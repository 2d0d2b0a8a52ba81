"""The routed experts as two grouped GEMMs over the (token, expert) pairs sorted by expert.

Reference: ``MoE.routed`` / ``MoE.routed_grouped`` (``moeserve/experts/moe.py``, the eager paths). The
pairs are sorted by local expert and each expert's run is padded to ``BLOCK_M`` rows, all with tensor ops of
fixed shapes and no host synchronisation (so a CUDA graph captures it). The first GEMM computes gate and up
together and writes ``silu(gate) * up``; the second multiplies by the routing weight and writes each pair's
row, and a token's ``top_k`` rows are summed in a fixed order (the result does not vary from run to run).
FP8 experts (float8 with float32 scales per 128 x 128 block, DeepSeek-V3's layout) are read as float8 and
scaled in registers: no dequantized copy of a layer's weights is ever written. On decode-sized steps the
shared experts can ride along as more experts (``shared``: pieces of the shared MLP as wide as a routed expert,
every token a pair of each), read from their own weights and summed apart before they are added.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels import dot_precision
from moeserve.kernels.moe_align import MAX_PAIRS as ALIGN_MAX_PAIRS
from moeserve.kernels.moe_align import SortedPairs, sort_pairs
from moeserve.kernels.moe_gemv import SharedWeights, moe_gemv, round_as, scale_args

# Up to this many (token, expert) pairs the split-K matrix-vector path runs, unsorted; measured crossovers on
# one H200 (benchmarks/bench_moe_kernels.py paths): bf16 V2-Lite experts between 66 and 96 pairs, FP8 V3
# experts past 256. (With uniformly random picks the sorted GEMM's 16-row blocks beat the split-K kernel at
# 256 pairs, 2.12 against 2.34 ms a layer (bench_moe_kernels.py sorted), but in the engine's V3 step at batch
# 32, with its grouped router, the sorted path took 6.55 ms against 6.29 for the split-K kernel: kept at 256)
GEMV_MAX_PAIRS = 64
FP8_GEMV_MAX_PAIRS = 256


@triton.jit
def _gemm_tile(a_ptr, a_row, row_ok, stride_am, w_base, stride_wn, up_offset, s_base, s_up_offset, stride_sk, cols,
               col_ok, K, GATED: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """A block's rows times one expert's weight tile: (acc, acc_up) [BLOCK_M, BLOCK_N] float32 (acc_up: the up
    rows, ``up_offset`` on from the gate rows, where GATED; FP8: their scales ``s_up_offset`` on)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ptrs = w_base + cols[None, :] * stride_wn + (k0 + ks)[:, None]
        w_mask = col_ok[None, :] & k_ok[:, None]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if FP8:
            s = tl.load(s_base + (k0 // SCALE_BLOCK) * stride_sk, mask=col_ok, other=0.0)
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION) * s[None, :]
        else:
            acc += tl.dot(a, w, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
            if FP8:
                s_up = tl.load(s_base + s_up_offset + (k0 // SCALE_BLOCK) * stride_sk, mask=col_ok, other=0.0)
                acc_up += tl.dot(a, w_up.to(a.dtype), input_precision=PRECISION) * s_up[None, :]
            else:
                acc_up += tl.dot(a, w_up, input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _routed_tile(a_ptr, a_row, row_ok, stride_am, w_ptr, scale_ptr, expert, stride_we, stride_wn, stride_se,
                 stride_sn, stride_sk, up_scale_offset, cols, col_ok, N, K, GATED: tl.constexpr, FP8: tl.constexpr,
                 SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``_gemm_tile`` on a routed expert's weights (and FP8 scales)."""
    s_base = scale_ptr + expert * stride_se + (cols // SCALE_BLOCK) * stride_sn
    return _gemm_tile(a_ptr, a_row, row_ok, stride_am, w_ptr + expert * stride_we, stride_wn, N * stride_wn, s_base,
                      up_scale_offset, stride_sk, cols, col_ok, K, GATED, FP8, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K,
                      PRECISION)


@triton.jit
def _store_routed(out_ptr, route_w_ptr, pair, row_ok, out_row, cols, mask, acc, stride_om, dtype: tl.constexpr,
                  MUL_ROUTE: tl.constexpr):
    """A routed block's rows, times the routing weight where MUL_ROUTE (rounded where the eager ops round)."""
    if MUL_ROUTE:
        route_w = round_as(tl.load(route_w_ptr + pair, mask=row_ok, other=0.0), dtype)
        acc = round_as(acc, dtype) * route_w[:, None]
    tl.store(out_ptr + out_row[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_pairs", "num_routed"])
def _moe_gemm(a_ptr, w_ptr, scale_ptr, out_ptr, pair_ptr, block_expert_ptr, num_padded_ptr, route_w_ptr,
              num_pairs, num_routed, num_local, N, K, stride_am, stride_we, stride_wn, stride_se, stride_sn,
              stride_sk, stride_om, up_scale_offset, sh_ptr, sh_piece, sh_stride_n, sh_out_ptr, A_DIV: tl.constexpr,
              GATED: tl.constexpr, MUL_ROUTE: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
              PIECES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + rows)
    row_ok = pair < num_pairs
    a_row = tl.where(row_ok, pair // A_DIV, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dtype = a_ptr.dtype.element_ty  # the activations' dtype, where the eager ops round
    if PIECES > 0:
        is_shared = expert >= num_local
        if is_shared:
            # a shared expert's piece (pairs from num_routed on, PIECES a token): its rows of the shared (bf16)
            # weights; a branch of its own, so that the routed experts' loads keep their specialised strides
            piece = expert - num_local
            if GATED:  # the input rows are the tokens'
                a_row = tl.where(row_ok, (pair - num_routed) // PIECES, 0).to(tl.int64)
            acc, acc_up = _gemm_tile(a_ptr, a_row, row_ok, stride_am, sh_ptr + piece * sh_piece, sh_stride_n,
                                     PIECES * sh_piece, scale_ptr, 0, stride_sk, cols, col_ok, K, GATED, False,
                                     SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        else:
            acc, acc_up = _routed_tile(a_ptr, a_row, row_ok, stride_am, w_ptr, scale_ptr, expert, stride_we,
                                       stride_wn, stride_se, stride_sn, stride_sk, up_scale_offset, cols, col_ok, N, K,
                                       GATED, FP8, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        acc, acc_up = _routed_tile(a_ptr, a_row, row_ok, stride_am, w_ptr, scale_ptr, expert, stride_we, stride_wn,
                                   stride_se, stride_sn, stride_sk, up_scale_offset, cols, col_ok, N, K, GATED, FP8,
                                   SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if GATED:  # silu(gate) * up, rounded where the eager ops round
        gate = round_as(acc, dtype)
        acc = round_as(gate / (1.0 + tl.exp(-gate)), dtype) * round_as(acc_up, dtype)
    out_row = tl.where(row_ok, pair, 0).to(tl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    if PIECES > 0 and MUL_ROUTE:
        if expert >= num_local:
            # a shared piece's row: float32, unrounded, in rows of their own (the pieces add up to one down
            # projection, rounded once where they are summed)
            sh_row = tl.where(row_ok, pair - num_routed, 0).to(tl.int64)
            tl.store(sh_out_ptr + sh_row[:, None] * stride_om + cols[None, :], acc, mask=mask)
        else:
            _store_routed(out_ptr, route_w_ptr, pair, row_ok, out_row, cols, mask, acc, stride_om, dtype, MUL_ROUTE)
    else:
        _store_routed(out_ptr, route_w_ptr, pair, row_ok, out_row, cols, mask, acc, stride_om, dtype, MUL_ROUTE)


_TILES_OVERRIDE = os.environ.get("MOESERVE_MOE_GEMM_TILES")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # rows (pairs) of one expert per program; each expert's run is padded to it
    block_n: int
    block_k: int  # FP8: divides the 128-wide scale block
    num_warps: int
    num_stages: int = 3


def gemm_config(num_rows: int, fp8: bool = False, pieces: int = 0) -> GemmConfig:
    """The tiles by the number of pairs (``benchmarks/bench_moe_kernels.py sorted`` sweeps them).
    ``MOESERVE_MOE_GEMM_TILES`` = "block_m,block_n,block_k,num_warps,num_stages" overrides them for every
    size: for trying a sweep's pick in the whole engine on a new GPU. ``pieces``: the shared experts' pieces
    are among the rows, and the kernel holds two load pipelines (the routed and the shared branch), each with
    its own shared-memory stages (``tests/test_kernels_compile.py`` checks that every pick fits sm_90)."""
    if _TILES_OVERRIDE:
        return GemmConfig(*(int(v) for v in _TILES_OVERRIDE.split(",")))
    if num_rows <= 64:
        return GemmConfig(16, 64, 128, 4)
    if num_rows <= 1024:
        # FP8 V3 at 256 pairs (163 of 256 experts reached, about 1.6 rows each): 16-row blocks 2.12 ms a layer
        # against 2.83 with 32 (H200, bench_moe_kernels.py sorted); bf16 V2-Lite's 384 pairs already stream
        # at 96% of the copy bandwidth with 32
        return GemmConfig(16, 64, 128, 4) if fp8 else GemmConfig(32, 64, 128, 4)
    # with the shared branch, three stages of these gate_up tiles want 240 KB, past sm_90's 227 KB
    return GemmConfig(64, 128, 64, 8, num_stages=2 if pieces else 3)


def _launch(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor,
            pairs: SortedPairs, route_w: torch.Tensor, a_div: int, gated: bool, mul_route: bool,
            block: tuple[int, int], cfg: GemmConfig, num_pairs: int, num_local: int,
            shared: SortedShared | None = None) -> None:
    """One of the two GEMMs over ``num_pairs`` pairs (the routed ones, then any shared pieces'). ``out``: a row
    per pair (the down projection: per routed pair; the shared pieces' rows go to ``shared.out``)."""
    block_m, block_n, block_k = cfg.block_m, cfg.block_n, cfg.block_k
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    fp8 = scale is not None
    if fp8:
        assert block_k <= block[1] and block[1] % block_k == 0 and block[0] == block[1]
    s, strides, up_offset = scale_args(scale, gated, w)
    sh = shared or SortedShared(w, 0, 0, 0, out)
    assert sh.out.stride(0) == out.stride(0)
    grid = (pairs.block_expert.numel(), triton.cdiv(n, block_n))
    _moe_gemm[grid](a, w, s, out, pairs.pair_ids, pairs.block_expert, pairs.num_padded, route_w,
                    num_pairs, route_w.numel(), num_local, n, k, a.stride(0), w.stride(0), w.stride(1), *strides,
                    out.stride(0), up_offset, sh.weight, sh.piece, sh.stride, sh.out, A_DIV=a_div, GATED=gated,
                    MUL_ROUTE=mul_route, FP8=fp8, SCALE_BLOCK=block[0] if fp8 else 128, PIECES=sh.pieces,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(a.dtype),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@dataclass(frozen=True)
class SortedShared:
    """The shared experts' side of one sorted GEMM: their weight (gate_up [2PI, H] or down [H, PI]), a piece's
    offset in it and its row stride (as ``moe_gemv._pair_tile`` reads them), the pieces, and where the down
    projection writes their rows ([T * P, H] float32)."""

    weight: torch.Tensor
    piece: int
    stride: int
    pieces: int
    out: torch.Tensor


def takes_gemv_path(num_pairs: int, fp8: bool) -> bool:
    """Whether ``fused_moe`` runs this many routed pairs through the split-K path (``moe_gemv``)."""
    return num_pairs <= (FP8_GEMV_MAX_PAIRS if fp8 else GEMV_MAX_PAIRS)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, route_w: torch.Tensor, local: torch.Tensor,
              num_local: int, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block: tuple[int, int] = (128, 128), shared: SharedWeights | None = None) -> torch.Tensor:
    """x: [T, H]; w13: [E, 2I, H] (gate rows then up rows); w2: [E, H, I]; route_w: [T, top_k] routing
    weights; local: [T * top_k] local expert of each pair (``num_local`` = served elsewhere).
    FP8 experts: w13/w2 float8 with ``w13_scale`` [E, 2, ceil(I/128), ceil(H/128)], ``w2_scale``
    [E, ceil(H/128), ceil(I/128)]. -> [T, H]: each token's sum over its local pairs of weight * expert(x).
    ``shared``: the shared experts' output added too, as routed-wide pieces (bf16 experts; on the sorted path
    only where the step's pairs fit ``moe_align``'s one launch: ``shared_fits_sorted``)."""
    if takes_gemv_path(local.numel(), w13_scale is not None):
        return moe_gemv(x, w13, w2, route_w, local, num_local, w13_scale, w2_scale, block, shared=shared)
    return fused_moe_sorted(x, w13, w2, route_w, local, num_local, w13_scale, w2_scale, block, shared=shared)


def shared_fits_sorted(num_tokens: int, num_pairs: int, pieces: int) -> bool:
    """Whether the sorted path can take the shared experts' ``pieces`` beside ``num_pairs`` routed pairs."""
    return num_pairs + num_tokens * pieces <= ALIGN_MAX_PAIRS


def fused_moe_sorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, route_w: torch.Tensor,
                     local: torch.Tensor, num_local: int, w13_scale: torch.Tensor | None = None,
                     w2_scale: torch.Tensor | None = None, block: tuple[int, int] = (128, 128),
                     config: GemmConfig | None = None, shared: SharedWeights | None = None) -> torch.Tensor:
    """``fused_moe`` over the pairs sorted by expert: tensor-core GEMMs, for more than a few pairs. The shared
    experts' pieces are more experts there, each taking every token; their rows stay float32 until summed."""
    num_tokens, top_k = route_w.shape
    inter = w13.shape[1] // 2
    pieces = 0 if shared is None else shared.pieces(inter)
    assert shared is None or (pieces > 0 and w13_scale is None), "shared experts: routed-wide pieces, bf16 only"
    num_pairs = local.numel() + num_tokens * pieces
    cfg = config or gemm_config(num_pairs, w13_scale is not None, pieces)
    pairs = sort_pairs(local, num_local, cfg.block_m, pieces, num_tokens)
    flat_w = route_w.reshape(-1).contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    # rows of pairs served elsewhere are never written, and the sum below skips them
    rows = torch.empty(local.numel(), w2.shape[1], dtype=x.dtype, device=x.device)
    # the shared pieces' rows (no tensor of none: the kernels never read it then, and an empty one has no address)
    sh_rows = torch.empty(num_tokens * pieces, w2.shape[1], dtype=torch.float32, device=x.device) if pieces else rows
    sh13 = sh2 = None
    if shared is not None:
        sh13 = SortedShared(shared.gate_up, inter * shared.gate_up.stride(0), shared.gate_up.stride(0), pieces, act)
        sh2 = SortedShared(shared.down, inter, shared.down.stride(0), pieces, sh_rows)
    _launch(x, w13, w13_scale, act, pairs, flat_w, top_k, True, False, block, cfg, num_pairs, num_local, sh13)
    _launch(act, w2, w2_scale, rows, pairs, flat_w, 1, False, True, block, cfg, num_pairs, num_local, sh2)
    out = torch.empty(num_tokens, w2.shape[1], dtype=x.dtype, device=x.device)
    _sum_pairs[(num_tokens, triton.cdiv(out.shape[1], 512))](rows, sh_rows, local, out, num_local, out.shape[1],
                                                             TOP_K=top_k, PIECES=pieces, BLOCK_N=512, num_warps=4)
    return out


@triton.jit
def _sum_pairs(rows_ptr, sh_rows_ptr, local_ptr, out_ptr, num_local, N, TOP_K: tl.constexpr, PIECES: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """out[t] = the sum of token t's held pair rows, in pair order, in float32, rounded once (the eager
    ``rows.view(T, top_k, N).sum(1)`` with the rows of pairs served elsewhere as zeros); with ``PIECES``, plus
    the shared experts' output (its pieces' float32 rows summed and rounded once), added as the eager ops add
    it."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in range(TOP_K):
        pair = token * TOP_K + j
        held = tl.load(local_ptr + pair) < num_local
        y = tl.load(rows_ptr + pair.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
        total += tl.where(held, y, 0.0)  # an unwritten row (a pair served elsewhere) adds nothing
    if PIECES > 0:
        shared = tl.zeros([BLOCK_N], tl.float32)
        for j in range(PIECES):
            shared += tl.load(sh_rows_ptr + (token * PIECES + j).to(tl.int64) * N + cols, mask=ok, other=0.0)
        total = round_as(total, dtype) + round_as(shared, dtype)
    tl.store(out_ptr + token.to(tl.int64) * N + cols, total.to(dtype), mask=ok)
