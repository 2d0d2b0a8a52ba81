"""A dense linear ``x @ W^T`` for a few rows (decode at batch 1-4): a split-K matrix-vector product that
streams the weight at memory bandwidth, where a library GEMM tiled for larger M reads it at a third of it.

Each program takes ``BLOCK_N`` weight rows and one of ``split`` pieces of the reduction dimension, loads
the tile once and multiplies it with every row of ``x`` (at most ``MAX_ROWS``); the pieces' float32 partials
are summed in a fixed order by a second launch, which rounds to the output dtype. No atomics: the result
does not vary from run to run. Reference: ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 4  # the kernel's row limit; more rows go to the library GEMM
BLOCK_N = 16
BLOCK_K = 128
TARGET_PROGRAMS = 528  # four per multiprocessor of an H200 (132): enough loads in flight to stream HBM


@triton.jit(do_not_specialize=["M"])
def _gemv_part(x_ptr, w_ptr, part_ptr, M, N, K, k_per_split, stride_x, stride_w,
               M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    col_ok = cols < N
    m = tl.arange(0, M_P)
    m_ok = m < M
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([M_P, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_hi
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], 2)
    out = part_ptr + (split * M_P + m[:, None]) * N + cols[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _gemv_sum(part_ptr, out_ptr, M, N, stride_o, M_P: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):
        total += tl.load(part_ptr + (s * M_P + row) * N + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, total.to(out_ptr.dtype.element_ty), mask=ok)


def splits_for(n: int, k: int) -> int:
    """Pieces of the reduction dimension: enough programs in all, each at least one ``BLOCK_K`` step."""
    tiles = triton.cdiv(n, BLOCK_N)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(k, BLOCK_K)))


def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, unit last stride); weight: [N, K] contiguous -> [M, N] in x's dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    assert rows <= MAX_ROWS and x.stride(-1) == 1 and weight.is_contiguous()
    m_p = triton.next_power_of_2(max(rows, 1))
    split = splits_for(n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
    split = triton.cdiv(k, k_per_split)
    part = torch.empty(split, m_p, n, dtype=torch.float32, device=x.device)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    _gemv_part[(triton.cdiv(n, BLOCK_N), split)](x, weight, part, rows, n, k, k_per_split, x.stride(0),
                                                 weight.stride(0), M_P=m_p, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                                 num_warps=4)
    _gemv_sum[(rows, triton.cdiv(n, 1024))](part, out, rows, n, out.stride(0), M_P=m_p, SPLIT=split, BLOCK=1024,
                                            num_warps=4)
    return out
