"""RMSNorm in one pass, optionally with the residual add before it (one kernel instead of about eight).

Reference: ``RMSNorm.forward`` (``moeserve/model/layers.py``) and the residual add ``h + out`` of
``DecoderLayer.forward``. Rounding follows the eager ops: the sum is rounded to the input dtype before it is
normalised, and the normalised row is rounded before the weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.pdl import pdl_args, pdl_enter


@triton.jit
def normed_row(x, w, n, eps, dtype: tl.constexpr):
    """RMSNorm of float32 row ``x`` (n values, masked-off columns zero) times float32 weight ``w``, rounded as the
    eager ops round (the normalised row to ``dtype`` before the weight multiplies it) -> float32, for the
    caller to round to its output dtype. Shared by every kernel that normalises a row (``router._logits``)."""
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    return (x * inv).to(dtype).to(tl.float32) * w


@triton.jit
def _rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n, eps,
              HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(dtype).to(tl.float32)
        tl.store(res_out_ptr + row * stride_ro + cols, x.to(dtype), mask=ok)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, normed_row(x, w, n, eps, dtype).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, D] (rows may be strided); weight: [D]. -> (norm(x + residual), x + residual); without a residual
    the second is ``x`` itself."""
    rows, dim = x.shape
    out = torch.empty(rows, dim, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    res = residual if residual is not None else x
    block = triton.next_power_of_2(dim)
    if rows:
        _rms_norm[(rows,)](x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0),
                           res_out.stride(0), dim, eps, HAS_RES=residual is not None, BLOCK=block,
                           num_warps=min(8, max(1, block // 256)), **pdl_args(x.device))
    return out, res_out
