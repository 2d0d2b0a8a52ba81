"""The routed experts for a few (token, expert) pairs: split-K matrix-vector products that stream the
experts' weights at memory bandwidth, with nothing sorted.

Reference: ``MoE.routed_grouped`` (``moeserve/experts/moe.py``), as ``fused_moe.fused_moe_sorted`` is. At
small decode batches each pair reads a whole expert (V2-Lite: 17 MB of weights for one token's row), so the
work is a stream of weights, and what matters is keeping enough loads in flight on every multiprocessor.
Each launch splits the rows of a weight into ``BLOCK_N`` tiles and its reduction dimension into
``split_k`` pieces, one program each, so that a handful of pairs still makes thousands of programs:

1. ``_gate_up``: partial gate and up products of each pair, [split, pair, 2I] in float32.
2. ``_down``: each pair's activation ``silu(gate) * up``, summed from the partials in a fixed order and
   rounded where the eager ops round, times the down projection: partials [split, pair, H].
3. ``_combine``: a token's ``top_k`` rows, each summed over its pieces, rounded and weighted, added in
   pair order. Nothing is accumulated by atomics: the result does not vary from run to run.

FP8 experts (float8 with float32 scales per 128 x 128 block) are read as stored; a weight tile lies in one
row block of scales, and the activation is multiplied by each column's block scale before the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.moe_gemv_programs import _combine, _down, _gate_up
from moeserve.kernels.pdl import pdl_args


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16  # weight rows per program (divides the FP8 scale block)
    block_k: int = 128  # reduction elements per loop step
    split_k: int = 2  # pieces of the reduction dimension, one program each
    num_warps: int = 4


def scale_args(scale: torch.Tensor | None, gated: bool, w: torch.Tensor):
    """(scale tensor, strides (expert, row block, column block), the up half's offset); the weight stands
    in when the experts are not FP8 (never read then)."""
    if scale is None:
        return w, (0, 0, 0), 0
    s = scale.flatten(1, 2) if gated else scale  # w13: [E, 2, nbo, nbi] -> gate and up row blocks
    return s, (s.stride(0), s.stride(1), s.stride(2)), scale.stride(1) if gated else 0


# tuned on one H200 (benchmarks/bench_moe_kernels.py sweep): bf16 V2-Lite experts at 64-78% of the copy
# bandwidth with the defaults; FP8 V3 experts at 81-91% with wider tiles and no split (1-8 tokens)
GATE_UP = GemvConfig()
DOWN = GemvConfig()
FP8_GATE_UP = GemvConfig(block_n=32, block_k=256, split_k=1, num_warps=8)
FP8_DOWN = GemvConfig(block_n=32, block_k=256, split_k=1, num_warps=4)
# FP8 from FP8_MANY_PAIRS pairs on (V3's batch 32: 256 pairs): narrower gate/up tiles, twice the programs. On one
# H100, V3 cut at batch 32 (profile_decode.py): gate/up 5.40 -> 5.26 ms a step with these tiles alone, 4.90 with
# them and the one-loop gate/up; the same as the few-pair tiles at 128 pairs (bench_moe_kernels.py; BENCHMARKS.md)
FP8_MANY_PAIRS = 128
FP8_GATE_UP_MANY = GemvConfig(block_n=16, block_k=256, split_k=1, num_warps=4)


def gemv_configs(num_pairs: int, fp8: bool) -> tuple[GemvConfig, GemvConfig]:
    """The (gate/up, down) launches' tiles for a step of ``num_pairs`` routed pairs."""
    if not fp8:
        return GATE_UP, DOWN
    return (FP8_GATE_UP_MANY if num_pairs >= FP8_MANY_PAIRS else FP8_GATE_UP), FP8_DOWN


@dataclass(frozen=True)
class SharedWeights:
    """A layer's shared experts, run as extra pairs of the routed kernel: ``gate_up`` [2 * P * I, H] (the gate
    rows, then the up rows) and ``down`` [H, P * I], cut into P pieces as wide as a routed expert (I), each
    piece one more pair of every token. The pieces' outputs add up to the shared MLP's: the activation is
    elementwise and the down projection a sum over the intermediate dimension."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def pieces(self, inter: int) -> int:
        """How many routed-expert-wide pieces the shared experts make; 0 where they do not cut evenly."""
        width = self.down.shape[1]
        fits = (width % inter == 0 and self.gate_up.shape[0] == 2 * width and self.gate_up.stride(1) == 1
                and self.down.stride(1) == 1)
        return width // inter if fits else 0


def moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, route_w: torch.Tensor, local: torch.Tensor,
             num_local: int, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
             block: tuple[int, int] = (128, 128), gate_up: GemvConfig | None = None,
             down: GemvConfig | None = None, shared: SharedWeights | None = None) -> torch.Tensor:
    """``fused_moe``'s contract (x: [T, H]; w13: [E, 2I, H]; w2: [E, H, I]; route_w: [T, top_k]; local:
    [T * top_k] local slot or ``num_local``) for a few pairs: three launches, nothing sorted or zeroed.
    ``shared``: the shared experts too (bf16 experts only), their output added to each token's as the
    eager ops add it (``routed + shared``)."""
    fp8 = w13_scale is not None
    num_tokens, top_k = route_w.shape
    num_routed = local.numel()
    default_up, default_down = gemv_configs(num_routed, fp8)
    cfg1 = gate_up or default_up
    cfg2 = down or default_down
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    pieces = 0 if shared is None else shared.pieces(inter)
    assert shared is None or (pieces > 0 and not fp8), "shared experts cut into routed-wide pieces, bf16 only"
    num_pairs = num_routed + num_tokens * pieces
    # the shared experts' pointers, piece steps and row strides (the routed weights stand in when there are none)
    sh13, sh2 = (w13, w2) if shared is None else (shared.gate_up, shared.down)
    if fp8:
        assert block[0] == block[1] and block[0] % cfg1.block_n == 0 and block[0] % cfg2.block_n == 0
    k1 = triton.cdiv(triton.cdiv(hidden, cfg1.split_k), cfg1.block_k) * cfg1.block_k
    split1 = triton.cdiv(hidden, k1)
    part_up = torch.empty(split1, num_pairs, 2 * inter, dtype=torch.float32, device=x.device)
    s, strides, up = scale_args(w13_scale, True, w13)
    _gate_up[(num_pairs, triton.cdiv(inter, cfg1.block_n), split1)](
        x, w13, s, part_up, local, num_local, num_pairs, num_routed, inter, hidden, k1, x.stride(0), w13.stride(0),
        w13.stride(1), *strides, up, sh13, inter * sh13.stride(0), sh13.stride(0), TOP_K=top_k, PIECES=pieces,
        FP8=fp8, SCALE_BLOCK=block[0], BLOCK_N=cfg1.block_n, BLOCK_K=cfg1.block_k, num_warps=cfg1.num_warps,
        **pdl_args(x.device))
    k2 = triton.cdiv(triton.cdiv(inter, cfg2.split_k), cfg2.block_k) * cfg2.block_k
    split2 = triton.cdiv(inter, k2)
    part_down = torch.empty(split2, num_pairs, hidden, dtype=torch.float32, device=x.device)
    s, strides, _ = scale_args(w2_scale, False, w2)
    dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]
    _down[(num_pairs, triton.cdiv(hidden, cfg2.block_n), split2)](
        part_up, w2, s, part_down, local, num_local, num_pairs, num_routed, hidden, inter, k2, w2.stride(0),
        w2.stride(1), *strides, sh2, inter, sh2.stride(0), TOP_K=top_k, PIECES=pieces, SPLIT_UP=split1, FP8=fp8,
        SCALE_BLOCK=block[0], BLOCK_N=cfg2.block_n, BLOCK_K=cfg2.block_k, DTYPE=dtype, num_warps=cfg2.num_warps,
        **pdl_args(x.device))
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    _combine[(num_tokens, triton.cdiv(hidden, 256))](
        part_down, route_w.reshape(-1).contiguous(), local, out, num_local, num_pairs, num_routed, hidden,
        out.stride(0), TOP_K=top_k, PIECES=pieces, SPLIT=split2, BLOCK_N=256, num_warps=4,
        **pdl_args(x.device))
    return out
