"""Rotary embedding of the rope slice of q or k in one kernel (the eager path runs about ten).

Reference: ``RotaryEmbedding.forward`` (``moeserve/model/layers.py``): cos/sin of each token's position from
the precomputed tables, pairs taken interleaved (DeepSeek's layout: (x0, x1), (x2, x3), ...) or as halves,
rotated in float32 and written de-interleaved ([even rotated | odd rotated]), rounded once to x's dtype.

NOTE: compiled without fused multiply-adds (``enable_fp_fusion=False``): ``x1 * cos - x2 * sin`` then rounds
as the eager ops round it (a product, a product, a difference), so the kernel matches its reference bit for
bit. With an FMA, one value in a few hundred landed on the other side of a bf16 rounding; through V3's
routers that alone moved the start-up check's output by 2e-2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotated(row, cos, sin, i, ok, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    """The rope slice at ``row`` (pairs interleaved or as halves) rotated in float32: (first, second) half of
    the de-interleaved output, each [..., HALF] with ``i`` = arange(HALF) on the last axis."""
    if INTERLEAVE:
        x1 = tl.load(row + 2 * i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(row + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + HALF + i, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xt, stride_xh, stride_ot, stride_oh,
          stride_table, HALF: tl.constexpr, INTERLEAVE: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = heads[:, None] < num_heads
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_table + i)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + i)[None, :]
    row = x_ptr + t.to(tl.int64) * stride_xt + heads[:, None] * stride_xh
    first, second = rotated(row, cos, sin, i[None, :], ok, HALF, INTERLEAVE)
    out = out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
    dtype = out_ptr.dtype.element_ty
    tl.store(out + i[None, :], first.to(dtype), mask=ok)
    tl.store(out + HALF + i[None, :], second.to(dtype), mask=ok)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         interleave: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H, dim] (any strides, the last one 1) or [T, dim]; positions: [T]; cos/sin: [P, dim / 2]
    float32 -> the rotated x in x's dtype: contiguous, or written into ``out`` (x's shape, the last stride 1:
    a slice of a wider buffer)."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    tokens, heads, dim = x3.shape
    if out is None:
        out = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    else:
        assert out.shape == x.shape and out.stride(-1) == 1
        out = out.unsqueeze(1) if squeeze else out
    block_h = min(16, triton.next_power_of_2(heads))
    if tokens:
        _rope[(tokens, triton.cdiv(heads, block_h))](
            x3, positions, cos, sin, out, heads, x3.stride(0), x3.stride(1), out.stride(0), out.stride(1),
            cos.stride(0), HALF=dim // 2, INTERLEAVE=interleave, BLOCK_H=block_h, num_warps=1,
            enable_fp_fusion=False)
    return out.squeeze(1) if squeeze else out
