"""RMSNorm, with the residual add before it, on CPU for bfloat16 rows in one pass (``cpu/rms_norm.cpp``).

Torch's composite makes a float32 copy of the rows and goes over it about seven times; at a 4,096-token
prefill that was 18% of the step on one core. The kernel keeps the composite's steps and roundings (sum
rounded to bf16, mean square in float32, normalised rows rounded to bf16, times the weight); only the order
of the mean's float32 additions differs, so an output differs from the composite's by one bf16 unit in about
one element in 100,000. [8192, 1024] with the residual add, one thread: 15.6 ms against 63. Built by
``cpu_build.py``; the reference is the composite (``tests/test_cpu_norm_kernel.py``).
"""

from __future__ import annotations

import torch

from moeserve.kernels.cpu_build import load_error


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.dim() == 2 and x.stride(-1) == 1 and not torch.is_grad_enabled() and load_error() is None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rmsnorm(residual + x) * weight, residual + x); without ``residual``: (rmsnorm(x) * weight, x)."""
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    return torch.ops.moeserve_cpu.rms_norm(x, weight, eps, residual)
