"""MLA's absorbed decode attention on CPU in one C++ call (``cpu/mla_decode.cpp``), read from the paged cache.

The eager path (``MLA._decode``) gathers every sequence's context into a scratch tensor, takes the scores and
the weighted sum with two oneDNN batched products (the second reorders the context for AMX again) and rounds
the scores to bf16 between them: the context is read three times. The kernel reads each row once through the
block table, in bf16 dot products (AVX-512 BF16) for every head of a group at once, with an online softmax in
float32 over chunks of 64 tokens and the weighted sum on pairs of rows (the probabilities rounded to bf16, as
the eager path rounds them). Measured on a 2-core AMX Xeon (one thread, 64 sequences of ~140 tokens, 8 heads,
bench_cpu's widths): 2.3-2.6 ms a layer against 4.0-4.3 eager. Built by ``cpu_build.py``; the reference is
the float32 eager path (``tests/test_cpu_mla_kernel.py``).
"""

from __future__ import annotations

import torch

from moeserve.kernels.cpu_build import mla_vectorized


def applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """bfloat16 queries and cache on a CPU where the kernel was built vectorised, outside autograd."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and cache.dtype == torch.bfloat16
            and not torch.is_grad_enabled() and mla_vectorized())


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               block_size: int, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """q [B, H, kv_lora + rope] (the absorbed query), cache [slots, kv_lora + rope] (flat), block_tables
    [B, nb], context_lens [B] -> softmax(q . context / scale) . context[:, :kv_lora]: [B, H, kv_lora]."""
    return torch.ops.moeserve_cpu.mla_decode(q.contiguous(), cache, block_tables.long(), context_lens.long(),
                                             block_size, kv_lora_rank, scale)
