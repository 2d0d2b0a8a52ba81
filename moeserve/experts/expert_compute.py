"""The routed experts held by one rank and their compute: ``RoutedExperts`` runs rows through them.

Every path takes the same arguments -- rows ``x`` [R, H], routing ``weights`` [R, k] and ``slots`` [R * k]
the local slot serving each pair (``num_local`` where this rank does not serve it) -- and returns [R, H],
each row the sum over its pairs served here of weight * expert(row). The all-reduce and the all-to-all
dispatch (``ep_dispatch.py``) both call it, so the fused kernel, the grouped GEMMs and the FP8 path apply
to either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels import cpu_moe
from moeserve.model.cpu_linear import PackedLinear, silu_and_mul
from moeserve.model.fp8 import FP8_DTYPE, DequantBuffer, scale_shape

if TYPE_CHECKING:
    from moeserve.kernels.moe_gemv import SharedWeights

# FP8 experts above this many tokens a step: dequantize + grouped GEMM. Measured on one H200 at V3's shapes
# (benchmarks/bench_moe_kernels.py paths): the fused kernel 11.7 ms a layer at 2048 tokens against 16.7,
# 34.5 at 8192 against 25.6
FP8_FUSED_MAX_TOKENS = 4096


class RoutedExperts(nn.Module):
    """``w13`` [E_local, 2I, H] (gate and up fused) and ``w2`` [E_local, H, I] of the experts in this rank's
    slots. A mixin of ``MoE``: the parameters keep the names the checkpoint loader writes to.

    ``fp8_block``: keep the experts in float8 with float32 block scales (``w13_scale_inv``
    [E_local, 2, ceil(I/bo), ceil(H/bi)], gate and up apart; ``w2_scale_inv`` [E_local, ceil(H/bo),
    ceil(I/bi)]) and dequantize them into ``dequant`` (shared by the model's layers) at each forward."""

    w13_scale_inv: torch.Tensor | None
    w2_scale_inv: torch.Tensor | None

    def _init_experts(self, num_local: int, inter: int, hidden: int, dtype: torch.dtype | None,
                      fp8_block: tuple[int, int] | None, dequant: DequantBuffer | None) -> None:
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.fp8_block = fp8_block
        self.dequant = dequant or DequantBuffer()
        store = FP8_DTYPE if fp8_block else dtype
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden, dtype=store), requires_grad=not fp8_block)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter, dtype=store), requires_grad=not fp8_block)
        if fp8_block is None:
            self.w13_scale_inv = self.w2_scale_inv = None
        else:
            shape13 = scale_shape((num_local, 2, inter, hidden), fp8_block)
            shape2 = scale_shape((num_local, hidden, inter), fp8_block)
            self.w13_scale_inv = nn.Parameter(torch.empty(shape13, dtype=torch.float32), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(torch.empty(shape2, dtype=torch.float32), requires_grad=False)
        self.fused = False  # the fused MoE kernel (kernels/fused_moe.py); set by DeepseekModel.use_kernels
        # FP8 experts are dequantized into a buffer shared by every layer: packing it would repack each call
        self.linear = PackedLinear(pack=fp8_block is None)
        # the CPU kernel (kernels/cpu_moe.py) where it applies; off: the loop (tests that compare two weight
        # formats on one path). Its packed copies of w13 and w2, keyed by the weights' versions
        self.cpu_kernel = True
        self._cpu_packs: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    @property
    def num_local(self) -> int:
        return int(self.w13.shape[0])

    @property
    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """The per-slot tensors (weights, and scales for FP8): what moving an expert copies."""
        named = {"w13": self.w13, "w2": self.w2, "w13_scale_inv": self.w13_scale_inv,
                 "w2_scale_inv": self.w2_scale_inv}
        return {name: t for name, t in named.items() if t is not None}

    def slots_changed(self) -> None:
        """Some slots now hold other experts: forget what was derived from the old weights."""
        self.linear._packs.clear()  # packed CPU weights of the old slots
        self._cpu_packs = None

    @property
    def dequant_numel(self) -> int:
        """Elements of ``dequant`` one forward of this layer uses (0 unless the experts are FP8)."""
        return 0 if self.fp8_block is None else self.w13.numel() + self.w2.numel()

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E_local, 2I, H], w2 [E_local, H, I]) in the compute dtype. FP8 experts are dequantized
        into the shared buffer: the views stay valid until another layer's call."""
        if self.fp8_block is None:
            return self.w13, self.w2
        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        w13, w2 = self.dequant.views([self.w13.shape, self.w2.shape], self.compute_dtype, self.w13.device)
        num_local, two_inter, hidden = self.w13.shape
        halves = (num_local, 2, two_inter // 2, hidden)  # gate and up have their own block grids
        self.dequant.dequantize(w13.view(halves), self.w13.view(halves), self.w13_scale_inv, self.fp8_block)
        self.dequant.dequantize(w2, self.w2, self.w2_scale_inv, self.fp8_block)
        return w13, w2

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                    shared: SharedWeights | None = None) -> torch.Tensor:
        """The path this layer runs: the fused kernel when on, else the eager ops. ``shared``: the shared
        experts to add in the fused kernel (``MoE.shared_in_kernel`` says when)."""
        if self.fused:
            return self.experts_fused(x, weights, slots, shared)
        assert shared is None
        return self.experts_eager(x, weights, slots)

    def experts_fused(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                      shared: SharedWeights | None = None) -> torch.Tensor:
        """By the fused Triton kernel; FP8 experts are read as they are stored, except in steps of more than
        ``FP8_FUSED_MAX_TOKENS`` tokens, where dequantizing every local expert once and two bf16 grouped GEMMs
        on tensor cores cost less."""
        from moeserve.kernels.fused_moe import fused_moe

        if self.fp8_block is not None and x.shape[0] > FP8_FUSED_MAX_TOKENS and self.use_grouped_mm(x):
            return self.experts_grouped(x, weights, slots)
        return fused_moe(x, self.w13, self.w2, weights, slots, self.num_local, self.w13_scale_inv,
                         self.w2_scale_inv, self.fp8_block or (128, 128), shared)

    def experts_eager(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Grouped GEMMs on GPUs; on CPUs with AMX the C++ kernel for decode-sized steps; a loop of matmuls
        elsewhere."""
        if self.use_grouped_mm(x):
            return self.experts_grouped(x, weights, slots)
        if self.cpu_kernel and self.fp8_block is None and cpu_moe.applies(x, slots.numel(), self.num_local,
                                                                          x.shape[-1], self.w2.shape[-1]):
            return self.experts_cpu_kernel(x, weights, slots)
        return self.experts_loop(x, weights, slots)

    def experts_cpu_kernel(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Every local expert in one C++ call (``kernels/cpu_moe.py``), on weights packed for it once."""
        key = (self.w13.data_ptr(), self.w13._version, self.w2.data_ptr(), self.w2._version)
        if self._cpu_packs is None or self._cpu_packs[0] != key:
            self._cpu_packs = (key, cpu_moe.pack_experts(self.w13), cpu_moe.pack_experts(self.w2))
        _, w13, w2 = self._cpu_packs
        return cpu_moe.routed_experts(x, weights, slots, self.num_local, w13, w2)

    @staticmethod
    def use_grouped_mm(x: torch.Tensor) -> bool:
        # NOTE: on GPUs one grouped GEMM replaces the loop over experts and its host sync; on CPU the loop of
        # plain matmuls is as fast and is what the float32 reference tests pin down.
        return x.is_cuda and hasattr(torch, "_grouped_mm")

    def experts_grouped(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Two grouped GEMMs and no host synchronisation."""
        top_k = weights.shape[1]
        num_local = self.num_local
        order = torch.argsort(slots, stable=True)
        counts = torch.zeros(num_local + 1, dtype=torch.long, device=slots.device).index_add_(
            0, slots, torch.ones_like(slots))  # bincount would synchronise with the host
        offsets = torch.cumsum(counts[:num_local], 0).to(torch.int32)
        token_ids = order // top_k
        w13, w2 = self.expert_weights()
        h = torch._grouped_mm(x[token_ids], w13.transpose(1, 2), offs=offsets)  # [N, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)  # [N, H]
        # rows past the last offset (experts held elsewhere) are left uninitialised by the kernel
        held = (slots[order] < num_local).unsqueeze(-1)
        y = torch.where(held, y * weights.flatten()[order].unsqueeze(-1).to(y.dtype), torch.zeros_like(y))
        # NOTE: each (token, k) row goes back to its place and a token's top_k rows are summed in a fixed
        # order; index_add_ on GPUs sums them by atomics, in an order (and so a bf16 result) that varies by run
        pairs = torch.empty_like(y).index_copy_(0, order, y)  # [T * top_k, H]
        return pairs.view(-1, top_k, y.shape[-1]).sum(1).to(x.dtype)

    def experts_loop(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Tokens are gathered once in slot order; each active expert runs two matmuls on its contiguous
        slice, and the weighting and the scatter back happen once for all experts."""
        top_k = weights.shape[1]
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.num_local + 1).tolist()
        order = order[:len(order) - counts[-1]]  # drop the (token, expert) pairs served elsewhere
        out = torch.zeros_like(x)
        if not len(order):
            return out
        token_ids = order // top_k
        xs = x[token_ids]  # [N, H] in expert order
        pair_weights = weights.flatten()[order].unsqueeze(-1).to(x.dtype)  # [N, 1]
        w13, w2 = self.expert_weights()
        start = 0
        # NOTE: each expert's rows are weighted and added in place as they come: no [N, H] concatenation and
        # product. index_add_ adds rows in index order, so the sums (and their rounding) are those of one
        # index_add_ over all N rows in expert order.
        for slot, count in enumerate(counts[:-1]):
            if count == 0:
                continue
            rows = slice(start, start + count)
            h = self.linear(xs[rows], w13[slot], ("w13", slot))
            y = self.linear(silu_and_mul(h), w2[slot], ("w2", slot))
            out.index_add_(0, token_ids[rows], y.mul_(pair_weights[rows]).to(out.dtype))
            start += count
        return out
