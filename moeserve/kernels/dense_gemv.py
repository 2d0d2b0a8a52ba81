"""Dense products of a few rows with a weight that is read once: ``y = x @ W^T`` (``dense_gemv``) and the
per-head ``x @ W`` of MLA's absorbed decode (``bmm_small``), for decode batches of 1-4 rows.

Reference: ``F.linear`` / ``torch.bmm``. Why: at M <= 4 a decode step's dense layers are a stream of weights,
and cuBLAS reads them at about half of HBM bandwidth on an H100 (V2-Lite at batch 1: 54 launches of
``nvjet ... 64x8`` took 0.37 ms a step for 630 MB, 1.7 TB/s of 3.35; the W_UK / W_UV bmm 0.18 ms for 113 MB).
An earlier split-K kernel (16 x 128 tiles and a second launch for the reduction) lost to cuBLAS (11.8 us
against 6.7 us a launch): here there is one launch and no split.

Design: each program owns ``BLOCK_N`` output columns (rows of W, or columns of W[h] for the bmm) and walks
the whole reduction in ``BLOCK_K`` steps; a step is a tensor-core product of the rows of x (padded to the
power of two ``M_P``; the instruction pads to 16 rows, which costs nothing that matters when the weight's
bytes are the work) with the [BLOCK_K, BLOCK_N] weight tile. Because the loop holds a ``tl.dot``, Triton's
pipeliner copies each step's tiles into shared memory with ``cp.async``, ``num_stages - 1`` steps ahead, so
every program keeps several 16-byte weight loads in flight; with every program resident at once, the bytes
in flight on an SM are about ``N / SMs * (num_stages - 1) * BLOCK_K * 2``, whatever ``BLOCK_N`` is, and
``BLOCK_N`` only spreads the columns over the SMs (``config_for``). One warp per 8 columns: the instruction
is 8 columns wide, and more warps on the same columns would repeat the same products. Each step's two
halves go to two accumulators, as a warp's products into one accumulator wait on each other. The
accumulators are float32, summed and rounded to x's dtype once, at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import dot_precision

MAX_ROWS = 4  # rows of x the kernels are for (decode batches; the CUDA graphs capture 1..4)
SMS = 132  # multiprocessors of an H100 / H200 SXM: what the configs spread the programs over


@triton.jit
def _rows_times_tile(x_ptrs, w_ptrs, row_ok, col_ok, K, stride_xk, stride_wk, M_P: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MASK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    """sum over k of x[m, k] * w[k, n] -> [M_P, BLOCK_N] float32, from ``x_ptrs`` [M_P, BLOCK_K // 2] and
    ``w_ptrs`` [BLOCK_K // 2, BLOCK_N] at k = 0. x's rows past M read as zeros, and W's columns where not
    ``col_ok`` too if ``MASK_N`` or K is no multiple of BLOCK_K (W's loads are unmasked otherwise)."""
    HALF: tl.constexpr = BLOCK_K // 2
    kh = tl.arange(0, HALF)
    acc_a = tl.zeros([M_P, BLOCK_N], tl.float32)
    acc_b = tl.zeros([M_P, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_a = tl.load(x_ptrs + k0 * stride_xk, mask=row_ok[:, None], other=0.0)
            x_b = tl.load(x_ptrs + (k0 + HALF) * stride_xk, mask=row_ok[:, None], other=0.0)
            if MASK_N:
                w_a = tl.load(w_ptrs + k0 * stride_wk, mask=col_ok[None, :], other=0.0)
                w_b = tl.load(w_ptrs + (k0 + HALF) * stride_wk, mask=col_ok[None, :], other=0.0)
            else:
                w_a = tl.load(w_ptrs + k0 * stride_wk)
                w_b = tl.load(w_ptrs + (k0 + HALF) * stride_wk)
        else:
            a_ok = (k0 + kh) < K
            b_ok = (k0 + HALF + kh) < K
            x_a = tl.load(x_ptrs + k0 * stride_xk, mask=row_ok[:, None] & a_ok[None, :], other=0.0)
            x_b = tl.load(x_ptrs + (k0 + HALF) * stride_xk, mask=row_ok[:, None] & b_ok[None, :], other=0.0)
            w_a = tl.load(w_ptrs + k0 * stride_wk, mask=a_ok[:, None] & col_ok[None, :], other=0.0)
            w_b = tl.load(w_ptrs + (k0 + HALF) * stride_wk, mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        acc_a = tl.dot(x_a, w_a, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(x_b, w_b, acc_b, input_precision=PRECISION)
    return acc_a + acc_b


@triton.jit(do_not_specialize=["M"])
def _gemv(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_ym, M_P: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.arange(0, M_P)
    row_ok = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kh = tl.arange(0, BLOCK_K // 2)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + kh[None, :] * stride_xk
    # columns past N read W's last row again (their stores are masked): the weight's loads need no mask on N
    w_ptrs = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[None, :] * stride_wn + kh[:, None]
    acc = _rows_times_tile(x_ptrs, w_ptrs, row_ok, cols < N, K, stride_xk, 1, M_P, BLOCK_N, BLOCK_K, EVEN_K, False,
                           PRECISION)
    y = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _bmm_small(x_ptr, w_ptr, out_ptr, M, N, K, stride_xh, stride_xm, stride_xk, stride_wh, stride_wk, stride_oh,
               stride_om, stride_on, M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, M_P)
    row_ok = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kh = tl.arange(0, BLOCK_K // 2)
    x_ptrs = x_ptr + head * stride_xh + rows[:, None] * stride_xm + kh[None, :] * stride_xk
    # W[h]'s rows are N-contiguous: a column mask (not a clamp, which would hide the contiguity) keeps the
    # 16-byte loads where N is a multiple of 8
    w_ptrs = w_ptr + head * stride_wh + kh[:, None].to(tl.int64) * stride_wk + cols[None, :]
    acc = _rows_times_tile(x_ptrs, w_ptrs, row_ok, col_ok, K, stride_xk, stride_wk, M_P, BLOCK_N, BLOCK_K, EVEN_K,
                           True, PRECISION)
    out = out_ptr + head * stride_oh + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_k(block_k: int, k: int) -> int:
    """The step, no longer than the reduction needs (at least 32: each half is a 16-deep product)."""
    return max(32, min(block_k, triton.next_power_of_2(k)))


def config_for(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of ``dense_gemv`` for a weight [n, k].

    The widest tile that still makes two programs an SM (N = 2048 gets 4 columns a program, 512 programs), one
    warp per 8 columns. Up to ~4 programs an SM (V2-Lite, V3's q_a + kv_a, o_proj) every program is resident
    at once, and each prefetches 3 steps of 512 (256 past N = 4096); V3's q_b (768 programs of 32 columns)
    keeps 2 steps, so that its programs still fit the shared memory in one wave."""
    block_n = next((b for b in (32, 16, 8) if triton.cdiv(n, b) >= 2 * SMS), 4)
    programs = triton.cdiv(n, block_n)
    return block_n, _block_k(512 if n <= 4096 else 256, k), max(1, block_n // 8), 4 if programs <= 4 * SMS else 3


def bmm_config_for(heads: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of ``bmm_small`` for weights [heads, k, n]: as ``config_for``,
    at least 8 columns (16-byte rows of W[h]); the whole reduction (128 or 512) is one or two steps of at most
    256 (an N-major tile of 512 steps spills registers on sm_90 at one or two warps)."""
    block_n = next((b for b in (32, 16) if heads * triton.cdiv(n, b) >= 2 * SMS), 8)
    return block_n, _block_k(256, k), max(1, block_n // 8), 3


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor,
               config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` for x [M, K] with 1 <= M <= ``MAX_ROWS`` and weight [N, K] (K-contiguous rows)
    -> y [M, N] in x's dtype. ``config``: (BLOCK_N, BLOCK_K, num_warps, num_stages), ``config_for``'s by default."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert x.dtype == weight.dtype and x.dtype in _DTYPES and x.device == weight.device, (x.dtype, weight.dtype)
    assert weight.stride(1) == 1, "the weight's rows must be contiguous"
    m, k = x.shape
    n = weight.shape[0]
    assert 1 <= m <= MAX_ROWS, f"{m} rows: dense_gemv is for 1..{MAX_ROWS}"
    block_n, block_k, num_warps, num_stages = config or config_for(n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, block_n),)](
        x, weight, y, m, n, k, x.stride(0), x.stride(1), weight.stride(0), y.stride(0),
        M_P=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages)
    return y


def bmm_small(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
              config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``torch.bmm(x, w, out=out)`` for x [H, M, K] with 1 <= M <= ``MAX_ROWS`` (any strides) and w [H, K, N]
    (N-contiguous rows) -> out [H, M, N] in x's dtype; ``out`` may have any strides (MLA writes the [H, B, *]
    view of a [B, H, *] buffer). ``config``: as ``dense_gemv``'s, ``bmm_config_for``'s by default."""
    assert x.dim() == 3 and w.dim() == 3 and x.shape[0] == w.shape[0] and x.shape[2] == w.shape[1], (x.shape, w.shape)
    assert x.dtype == w.dtype and x.dtype in _DTYPES and x.device == w.device, (x.dtype, w.dtype)
    assert w.stride(2) == 1, "the rows of each W[h] must be contiguous"
    heads, m, k = x.shape
    n = w.shape[2]
    assert 1 <= m <= MAX_ROWS, f"{m} rows: bmm_small is for 1..{MAX_ROWS}"
    if out is None:
        out = torch.empty(heads, m, n, dtype=x.dtype, device=x.device)
    assert out.shape == (heads, m, n) and out.dtype == x.dtype and out.device == x.device, (out.shape, out.dtype)
    block_n, block_k, num_warps, num_stages = config or bmm_config_for(heads, n, k)
    _bmm_small[(triton.cdiv(n, block_n), heads)](
        x, w, out, m, n, k, *x.stride(), w.stride(0), w.stride(1), *out.stride(),
        M_P=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages)
    return out
