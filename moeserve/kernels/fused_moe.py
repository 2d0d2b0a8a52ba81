"""The routed experts as two grouped GEMMs over the (token, expert) pairs sorted by expert.

Reference: ``MoE.routed`` / ``MoE.routed_grouped`` (``moeserve/experts/moe.py``, the eager paths). The
pairs are sorted by local expert and each expert's run is padded to ``BLOCK_M`` rows, all with tensor ops of
fixed shapes and no host synchronisation (so a CUDA graph captures it). The first GEMM computes gate and up
together and writes ``silu(gate) * up``; the second multiplies by the routing weight and writes each pair's
row, and a token's ``top_k`` rows are summed in a fixed order (the result does not vary from run to run).
FP8 experts (float8 with float32 scales per 128 x 128 block, DeepSeek-V3's layout) are read as float8 and
scaled in registers: no dequantized copy of a layer's weights is ever written. The shared experts stay
apart on this path (only the split-K path, ``moe_gemv``, adds them as more pairs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels import dot_precision
from moeserve.kernels.moe_align import SortedPairs, sort_pairs
from moeserve.kernels.moe_gemv import SharedWeights, moe_gemv, scale_args
from moeserve.kernels.moe_gemv_programs import round_as
from moeserve.kernels.pdl import pdl_args, pdl_enter

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


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm(a_ptr, w_ptr, scale_ptr, out_ptr, pair_ptr, block_expert_ptr, num_padded_ptr, route_w_ptr,
              num_pairs, N, K, stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_om,
              up_scale_offset, A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTE: tl.constexpr, FP8: tl.constexpr,
              SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
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
    s_base = scale_ptr + expert * stride_se + (cols // SCALE_BLOCK) * stride_sn  # FP8: the expert's scales
    acc, acc_up = _gemm_tile(a_ptr, a_row, row_ok, stride_am, w_ptr + expert * stride_we, stride_wn, N * stride_wn,
                             s_base, up_scale_offset, stride_sk, cols, col_ok, K, GATED, FP8, SCALE_BLOCK, BLOCK_M,
                             BLOCK_N, BLOCK_K, PRECISION)
    if GATED:  # silu(gate) * up, rounded where the eager ops round
        gate = round_as(acc, dtype)
        acc = round_as(gate / (1.0 + tl.exp(-gate)), dtype) * round_as(acc_up, dtype)
    if MUL_ROUTE:  # times the pair's routing weight, rounded where the eager ops round
        route_w = round_as(tl.load(route_w_ptr + pair, mask=row_ok, other=0.0), dtype)
        acc = round_as(acc, dtype) * route_w[:, None]
    out_row = tl.where(row_ok, pair, 0).to(tl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + out_row[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_TILES_OVERRIDE = os.environ.get("MOESERVE_MOE_GEMM_TILES")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # rows (pairs) of one expert per program; each expert's run is padded to it
    block_n: int
    block_k: int  # FP8: divides the 128-wide scale block
    num_warps: int
    num_stages: int = 3


def gemm_config(num_rows: int, fp8: bool = False) -> GemmConfig:
    """The tiles by the number of pairs (``benchmarks/bench_moe_kernels.py sorted`` sweeps them).
    ``MOESERVE_MOE_GEMM_TILES`` = "block_m,block_n,block_k,num_warps,num_stages" overrides them for every
    size: for trying a sweep's pick in the whole engine on a new GPU (``tests/test_kernels_compile.py`` checks
    that every pick here fits sm_90's shared memory)."""
    if _TILES_OVERRIDE:
        return GemmConfig(*(int(v) for v in _TILES_OVERRIDE.split(",")))
    if num_rows <= 64:
        return GemmConfig(16, 64, 128, 4)
    if num_rows <= 1024:
        # FP8 V3 at 256 pairs (163 of 256 experts reached, about 1.6 rows each): 16-row blocks 2.12 ms a layer
        # against 2.83 with 32 (H200, bench_moe_kernels.py sorted); bf16 V2-Lite's 384 pairs already stream
        # at 96% of the copy bandwidth with 32
        return GemmConfig(16, 64, 128, 4) if fp8 else GemmConfig(32, 64, 128, 4)
    return GemmConfig(64, 128, 64, 8)


def _launch(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor,
            pairs: SortedPairs, route_w: torch.Tensor, a_div: int, gated: bool, mul_route: bool,
            block: tuple[int, int], cfg: GemmConfig) -> None:
    """One of the two GEMMs over the routed pairs. ``out``: a row per pair."""
    block_m, block_n, block_k = cfg.block_m, cfg.block_n, cfg.block_k
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    fp8 = scale is not None
    if fp8:
        assert block_k <= block[1] and block[1] % block_k == 0 and block[0] == block[1]
    s, strides, up_offset = scale_args(scale, gated, w)
    grid = (pairs.block_expert.numel(), triton.cdiv(n, block_n))
    _moe_gemm[grid](a, w, s, out, pairs.pair_ids, pairs.block_expert, pairs.num_padded, route_w,
                    route_w.numel(), n, k, a.stride(0), w.stride(0), w.stride(1), *strides, out.stride(0),
                    up_offset, A_DIV=a_div, GATED=gated, MUL_ROUTE=mul_route, FP8=fp8,
                    SCALE_BLOCK=block[0] if fp8 else 128, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    PRECISION=dot_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    **pdl_args(a.device))


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
    ``shared``: the shared experts' output added too, as routed-wide pieces; only on the split-K path
    (``takes_gemv_path``): the sorted path takes the routed experts alone."""
    if takes_gemv_path(local.numel(), w13_scale is not None):
        return moe_gemv(x, w13, w2, route_w, local, num_local, w13_scale, w2_scale, block, shared=shared)
    assert shared is None, "the shared experts run in the routed kernel on its split-K path only"
    return fused_moe_sorted(x, w13, w2, route_w, local, num_local, w13_scale, w2_scale, block)


def fused_moe_sorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, route_w: torch.Tensor,
                     local: torch.Tensor, num_local: int, w13_scale: torch.Tensor | None = None,
                     w2_scale: torch.Tensor | None = None, block: tuple[int, int] = (128, 128),
                     config: GemmConfig | None = None) -> torch.Tensor:
    """``fused_moe`` over the pairs sorted by expert: tensor-core GEMMs, for more than a few pairs (the routed
    experts only)."""
    num_tokens, top_k = route_w.shape
    inter = w13.shape[1] // 2
    cfg = config or gemm_config(local.numel(), w13_scale is not None)
    pairs = sort_pairs(local, num_local, cfg.block_m)
    flat_w = route_w.reshape(-1).contiguous()
    act = torch.empty(local.numel(), inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, w13_scale, act, pairs, flat_w, top_k, True, False, block, cfg)
    # rows of pairs served elsewhere are never written, and the sum below skips them
    rows = torch.empty(local.numel(), w2.shape[1], dtype=x.dtype, device=x.device)
    _launch(act, w2, w2_scale, rows, pairs, flat_w, 1, False, True, block, cfg)
    out = torch.empty(num_tokens, w2.shape[1], dtype=x.dtype, device=x.device)
    _sum_pairs[(num_tokens, triton.cdiv(out.shape[1], 512))](rows, local, out, num_local, out.shape[1], TOP_K=top_k,
                                                             BLOCK_N=512, num_warps=4, **pdl_args(out.device))
    return out


@triton.jit
def _sum_pairs(rows_ptr, local_ptr, out_ptr, num_local, N, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
               PDL: tl.constexpr = False):
    """out[t] = the sum of token t's held pair rows, in pair order, in float32, rounded once (the eager
    ``rows.view(T, top_k, N).sum(1)`` with the rows of pairs served elsewhere as zeros)."""
    pdl_enter(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in range(TOP_K):
        pair = token * TOP_K + j
        held = tl.load(local_ptr + pair) < num_local
        y = tl.load(rows_ptr + pair.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
        total += tl.where(held, y, 0.0)  # an unwritten row (a pair served elsewhere) adds nothing
    tl.store(out_ptr + token.to(tl.int64) * N + cols, total.to(out_ptr.dtype.element_ty), mask=ok)
