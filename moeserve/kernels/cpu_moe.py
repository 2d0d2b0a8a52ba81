"""The routed experts on CPU in one C++ call (``cpu/moe_experts.cpp``), for decode-sized steps.

At decode a MoE layer's experts each see a few rows (16 on average at batch 64 with 16 experts and top-4), so
the Python loop of ``RoutedExperts.experts_loop`` pays two oneDNN calls, an activation, a weighting and a
scatter per expert, one after another, each call splitting a 16-row product over the cores. The kernel runs
every active expert's products on oneDNN's batch-reduce micro-kernel (AMX tiles; PyTorch exports it as
``at::native::cpublas::brgemm``), parallel over (expert, block of output columns), with silu(gate) * up and
the routing weight applied as each block leaves the micro-kernel and each token's pairs summed in float32 in
its top-k order. Measured on a 2-core AMX Xeon (one thread, bench_cpu's experts, BENCHMARKS.md): 2.8 ms a
layer against 7.6 for the loop at 64 tokens; at 1,024 tokens and more oneDNN's own large-product kernels
win, so longer steps keep the loop (``MAX_ROWS_PER_EXPERT``).

Built and loaded by ``cpu_build.py``; used where the micro-kernel takes AMX tiles. The reference is the loop
(``tests/test_cpu_moe_kernel.py``). Memory: the packed copy of a layer's experts is as large as its weights
(made at the first decode step; the prefill loop's ``PackedLinear`` keeps a copy of its own, so bf16 experts on
CPU are held three times).
"""

from __future__ import annotations

import torch

from moeserve.kernels.cpu_build import amx_tiles

BLOCK = 32  # the kernel's block of output columns: hidden and intermediate sizes must be multiples of it
# steps whose experts see more rows than this on average keep the loop of oneDNN products
MAX_ROWS_PER_EXPERT = 64


def applies(x: torch.Tensor, num_pairs: int, num_local: int, hidden: int, inter: int) -> bool:
    """Whether the kernel runs these rows: bfloat16 on a CPU with AMX, block-sized widths, a decode-sized step."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()
            and hidden % BLOCK == 0 and inter % BLOCK == 0 and num_pairs <= MAX_ROWS_PER_EXPERT * num_local
            and amx_tiles())


def pack_experts(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] bfloat16 expert weights -> the kernel's layout (same size; made once per weight version)."""
    return torch.ops.moeserve_cpu.pack_experts(w.detach().contiguous())


def routed_experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, num_local: int,
                   w13_packed: torch.Tensor, w2_packed: torch.Tensor) -> torch.Tensor:
    """``RoutedExperts.experts_loop``'s contract: x [T, H], weights [T, k], slots [T * k] (``num_local``: not
    served here) -> [T, H], each row the sum over its pairs served here of weight * expert(row)."""
    xs, offsets, pair_weights, pair_of = torch.ops.moeserve_cpu.sort_pairs(
        x, weights.float().contiguous(), slots.long().contiguous(), num_local)  # grouped by expert, stable
    if not xs.shape[0]:
        return torch.zeros_like(x)
    pairs = torch.ops.moeserve_cpu.expert_pairs(xs, offsets, w13_packed, w2_packed, pair_weights)
    return torch.ops.moeserve_cpu.sum_pairs(pairs, pair_of, x)
