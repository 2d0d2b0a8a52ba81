"""FP8 block-scaled weights (``float8_e4m3fn`` with a float32 ``weight_scale_inv`` per block, as DeepSeek-V3
ships them): which checkpoint tensors are FP8, dequantization, and the one buffer FP8 layers compute from.

A weight ``[out, in]`` with block ``(bo, bi)`` has ``scale_inv [ceil(out / bo), ceil(in / bi)]``; its value
is ``float32(weight) * scale_inv[row // bo, col // bi]``, rounded once to the compute dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from moeserve.model.config import ModelConfig

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# DeepSeek-V3 keeps embeddings, norms, the router and the LM head in high precision; every other matrix is FP8
_HIGH_PRECISION = ("embed_tokens", "lm_head", "layernorm", "norm.weight", "mlp.gate.", "eh_proj", "shared_head.head")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether an FP8 checkpoint of DeepSeek's layout stores tensor ``name`` (of ``shape``) in float8."""
    return len(shape) == 2 and not any(s in name for s in _HIGH_PRECISION)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """[..., out, in] -> the shape of its ``weight_scale_inv``: [..., ceil(out / bo), ceil(in / bi)]."""
    *lead, out_dim, in_dim = shape
    return (*lead, cdiv(out_dim, block[0]), cdiv(in_dim, block[1]))


def routed_fp8_block(config: ModelConfig, keep_fp8: bool, tp_size: int = 1,
                     expert_tp: bool = False) -> tuple[int, int] | None:
    """The block the routed experts are kept FP8 with, or None (dequantized on load).

    Experts are kept only when asked (``keep_fp8``), the checkpoint is block-scaled, and -- if their
    intermediate dim is split over ``tp_size`` ranks (``expert_tp``) -- every rank's slice starts on a block
    boundary, so its scales are a plain slice of the checkpoint's. DeepSeek-V3 (2048 / tp, tp <= 16) qualifies.
    """
    block = config.quant_block_size
    if not keep_fp8 or block is None or not config.n_routed_experts:
        return None
    if expert_tp and tp_size > 1:
        local = config.moe_intermediate_size // tp_size
        if local % block[0] or local % block[1]:
            return None
    return block


def _expanded(scale_inv: torch.Tensor, out_dim: int, in_dim: int, block: tuple[int, int]) -> torch.Tensor:
    """[..., nbo, nbi] -> [..., out, in]: each block's scale repeated over its (possibly partial) block."""
    return scale_inv.repeat_interleave(block[0], -2)[..., :out_dim, :].repeat_interleave(block[1], -1)[..., :in_dim]


@torch.no_grad()
def dequantize_into(out: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                    block: tuple[int, int]) -> torch.Tensor:
    """out [..., O, I] (any float dtype) = weight [..., O, I] (float8) * its block scales [..., nbo, nbi].

    NOTE: the float8 -> ``out`` cast is exact (e4m3 fits bf16 and float32) and the in-place multiply by a
    float32 scale computes in float32 and rounds once, so the result equals ``dequantize_fp8`` bit for bit.
    With whole blocks nothing but ``out`` is allocated; partial blocks expand the scales (small models only).
    """
    *lead, out_dim, in_dim = weight.shape
    bo, bi = block
    if tuple(scale_inv.shape) != scale_shape(tuple(weight.shape), block):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected "
                         f"{scale_shape(tuple(weight.shape), block)} for a weight of {tuple(weight.shape)}")
    out.copy_(weight)
    if out_dim % bo == 0 and in_dim % bi == 0:
        blocks = out.view(*lead, out_dim // bo, bo, in_dim // bi, bi)
        blocks.mul_(scale_inv.unsqueeze(-1).unsqueeze(-3))  # [..., nbo, 1, nbi, 1]
    else:
        out.mul_(_expanded(scale_inv, out_dim, in_dim, block))
    return out


def _dequantize_whole_blocks(out: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bo: int,
                             bi: int) -> None:
    """``dequantize_into`` for whole blocks as one expression: the body of the compiled kernel."""
    *lead, out_dim, in_dim = weight.shape
    blocks = (*lead, out_dim // bo, bo, in_dim // bi, bi)
    out.view(blocks).copy_(weight.view(blocks).float() * scale_inv.unsqueeze(-1).unsqueeze(-3))


class DequantBuffer:
    """The one grow-only buffer that all FP8 layers of a model dequantize into, one layer at a time.

    Layers run one after another, so a buffer the size of the largest layer's weights serves them all;
    what a layer gets is valid until the next layer asks. ``reserve`` allocates it up front, so that the
    memory it takes is gone before the cache is sized from what is free.

    NOTE: on accelerators whole blocks are dequantized by a ``torch.compile``d kernel: one pass that reads
    1 byte and writes 2 per weight, about 10x the eager copy-then-multiply (1.1 vs 11 ms for a DeepSeek-V3
    layer of 32 experts on an H200) and bit-equal to it. If compiling fails the eager path is used.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self._compiled: Callable[..., None] | None = None
        self._compile_failed = False

    def reserve(self, numel: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        t = self.tensor
        device = torch.device(device) if device is not None else torch.empty(0).device
        if device.type != "cpu" and device.index is None:
            device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
        if t is None or t.numel() < numel or t.dtype != dtype or t.device != device:
            self.tensor = None  # free the old one first
            self.tensor = torch.empty(numel, dtype=dtype, device=device)

    def views(self, shapes: list[torch.Size], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """Disjoint contiguous views of the buffer, one per shape."""
        sizes = [torch.Size(s).numel() for s in shapes]
        self.reserve(sum(sizes), dtype, device)
        assert self.tensor is not None
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(self.tensor[start:start + size].view(shape))
            start += size
        return out

    def dequantize(self, out: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor:
        """``dequantize_into``, by the compiled kernel where it applies."""
        whole = weight.shape[-2] % block[0] == 0 and weight.shape[-1] % block[1] == 0
        if weight.device.type == "cpu" or not whole or self._compile_failed:
            return dequantize_into(out, weight, scale_inv, block)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(_dequantize_whole_blocks, dynamic=False)
            self._compiled(out, weight, scale_inv, *block)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back to the eager path)
            logger.warning("compiling the FP8 dequantization kernel failed (%s); using the eager path", e)
            self._compile_failed = True
            return dequantize_into(out, weight, scale_inv, block)
        return out
