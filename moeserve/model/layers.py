"""Basic layers on local shapes: RMSNorm, rotary embedding (with YaRN), the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.comm.shard import SINGLE, ShardInfo
from moeserve.kernels import cpu_mla, cpu_norm
from moeserve.model.config import RopeConfig, yarn_get_mscale
from moeserve.model.cpu_linear import PackedLinear, by_row_blocks, row_block, silu_and_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.fused = False  # the Triton kernel (kernels/rmsnorm.py); set by DeepseekModel.use_kernels

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(residual + x), residual + x): the residual add and the norm after it."""
        if self.fused and x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1:
            from moeserve.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if cpu_norm.applies(x, self.weight) and residual.shape == x.shape and residual.dtype == x.dtype:
            return cpu_norm.rms_norm(x, self.weight, self.eps, residual)
        total = residual + x
        return self(total), total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2 and x.stride(-1) == 1:
            from moeserve.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)[0]
        if cpu_norm.applies(x, self.weight):
            return cpu_norm.rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        if dtype != torch.float32 and self.weight.dtype == dtype and not x.requires_grad:
            # the same float32 steps in torch's composite (bit for bit), 30% less time on CPU at [4096, 1024]
            return F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(dtype).mul_(self.weight)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    base = rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    orig = rope.original_max_position_embeddings or 4096

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def rope_attention_factor(rope: RopeConfig) -> float:
    """YaRN's multiplier on cos/sin (1.0 for plain RoPE)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_get_mscale(rope.factor)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_positions); applied to the rope slice of q and k.

    With ``interleave`` (DeepSeek's layout) dimension pairs are (x0, x1), (x2, x3), ...; the output is
    written de-interleaved ([even rotated | odd rotated]). Since q and k get the same permutation, their
    dot product is unchanged, and the cache stores keys in this layout.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int):
        super().__init__()
        self.interleave = rope.interleave
        inv_freq = _yarn_inv_freq(rope, dim) if rope.rope_type == "yarn" else \
            1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, dim/2]
        factor = rope_attention_factor(rope)
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)
        self.fused = False  # the Triton kernel (kernels/rope.py); set by DeepseekModel.use_kernels
        half = dim // 2
        self.kernel_fits = half >= 1 and half & (half - 1) == 0  # the kernel takes the half whole

    def forward(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, ..., dim] with positions [T] -> rotated x (same shape and dtype), written into ``out`` where
        given (x's shape; a slice of a wider buffer, the last stride 1)."""
        if self.fused and self.kernel_fits and x.dim() in (2, 3) and x.stride(-1) == 1:
            from moeserve.kernels.rope import rope

            return rope(x, positions, self.cos, self.sin, self.interleave, out)
        if cpu_mla.rope_applies(x, self.cos):  # bf16 on CPU: one C++ call
            return cpu_mla.rope_into(x, positions, self.cos, self.sin, self.interleave, out)
        if out is not None:
            return out.copy_(self(x, positions))
        cos = self.cos[positions]
        sin = self.sin[positions]
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). gate and up are kept as one fused weight.

    Tensor parallel: the intermediate dimension is split over the shard's ranks (gate/up by rows, down by
    columns), so each rank's output is a partial sum, reduced here unless the caller reduces (``reduce``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype | None = None,
                 shard: ShardInfo = SINGLE, reduce: bool = True):
        super().__init__()
        self.shard = shard
        self.reduce = reduce
        self.full_intermediate_size = intermediate_size
        self.intermediate_size = shard.split(intermediate_size, "intermediate size")
        self.gate_up_proj = nn.Parameter(torch.empty(2 * self.intermediate_size, hidden_size, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(hidden_size, self.intermediate_size, dtype=dtype))
        self.linear = PackedLinear()
        self.fused = False  # the activation's kernel (kernels/activation.py); set by DeepseekModel.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.bfloat16:
            # NOTE: a long prefill goes through in blocks of rows, so that each block's [rows, 2I] gate/up
            # product is still in cache when the activation and the down projection read it
            block = row_block(x.shape[0], self.gate_up_proj.shape[0], x.element_size())
            out = by_row_blocks(self._swiglu, x, block, self.down_proj.shape[0])
        else:
            out = self._swiglu(x)
        return self.shard.all_reduce(out) if self.reduce else out

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x, self.gate_up_proj, "gate_up_proj")
        if self.fused and h.dim() == 2 and h.stride(-1) == 1:
            from moeserve.kernels.activation import silu_and_mul as fused_silu_and_mul

            act = fused_silu_and_mul(h)
        else:
            act = silu_and_mul(h)
        return self.linear(act, self.down_proj, "down_proj")
