"""SwiGLU's activation in one kernel: silu(gate) * up over a [rows, 2I] gate|up product (the eager path,
``model/cpu_linear.py:silu_and_mul``, is two launches and a second pass over the [rows, I] half).

Rounding follows the eager ops: silu in float32, rounded to the input dtype, then the product with ``up`` in
float32, rounded once more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.pdl import pdl_args, pdl_enter


@triton.jit
def _silu_and_mul(h_ptr, out_ptr, inter, stride_h, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(dtype), mask=ok)


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """h: [T, 2I] (gate | up; rows may be strided, the last stride 1) -> silu(gate) * up [T, I] in h's dtype."""
    rows, width = h.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(inter))
    if rows:
        _silu_and_mul[(rows, triton.cdiv(inter, block))](h, out, inter, h.stride(0), out.stride(0), BLOCK=block,
                                                         num_warps=4, **pdl_args(h.device))
    return out
