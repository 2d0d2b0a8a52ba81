"""MLA's absorbed decode attention on CPU in one C++ call (``cpu/mla_decode.cpp``), read from the paged cache.

The eager path (``MLA._decode``) gathers every sequence's context into a scratch tensor, takes the scores and
the weighted sum with two oneDNN batched products (the second reorders the context for AMX again) and rounds
the scores to bf16 between them: the context is read three times. The kernel reads each row once through the
block table, in bf16 dot products (AVX-512 BF16) for every head of a group at once, with an online softmax in
float32 over chunks of 64 tokens and the weighted sum on pairs of rows (the probabilities rounded to bf16, as
the eager path rounds them). Measured on a 2-core AMX Xeon (one thread, 64 sequences of ~140 tokens, 8 heads,
bench_cpu's widths): 2.3-2.6 ms a layer against 4.0-4.3 eager; with the head count a compile-time constant for
8 and 16 heads (the accumulators then stay in registers), 200 tokens: 3.65 -> 2.71 ms at one thread, 1.69 ->
1.45 at two (``benchmarks/bench_cpu_mla_decode.py``). It is bound by its dpbf16 arithmetic, not by reading the
rows: a cache that stays in L2 gives 2.43 ms. Where the compiler had AMX (``cpu/mla_decode_amx.cpp``), the
scores and the weighted sum run on the tile unit instead, for up to 16 heads and 16-row cache blocks: 200
tokens, 1.39 -> 0.67 ms at two threads (22 GB/s of rows, this machine's bandwidth), 1.33 ms against 2.64 at
one. Built by ``cpu_build.py``; the reference is the float32 eager path (``tests/test_cpu_mla_kernel.py``).
"""

from __future__ import annotations

import torch

from moeserve.kernels.cpu_build import load_error, mla_vectorized


def applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """bfloat16 queries and cache on a CPU where the kernel was built vectorised, outside autograd."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and cache.dtype == torch.bfloat16
            and not torch.is_grad_enabled() and mla_vectorized())


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               block_size: int, kv_lora_rank: int, scale: float, tiles: bool = True) -> torch.Tensor:
    """q [B, H, kv_lora + rope] (the absorbed query), cache [slots, kv_lora + rope] (flat), block_tables
    [B, nb], context_lens [B] -> softmax(q . context / scale) . context[:, :kv_lora]: [B, H, kv_lora].
    ``tiles=False``: the AVX-512 path even where the AMX one fits (tests and benchmarks compare them)."""
    return torch.ops.moeserve_cpu.mla_decode(q.contiguous(), cache, block_tables.long(), context_lens.long(),
                                             block_size, kv_lora_rank, scale, tiles)


def rope_applies(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """``rope_into`` runs ``x`` with the table ``cos``: bfloat16 rows and float32 tables on a CPU where the
    kernels built, outside autograd."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and cos.dtype == torch.float32 and x.dim() in (2, 3)
            and x.stride(-1) == 1 and x.shape[-1] % 2 == 0 and not torch.is_grad_enabled() and load_error() is None)


def rope_into(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``RotaryEmbedding.forward`` in one call (``cpu/mla_prologue.cpp``): x [T, (H,) rope] -> rotated, into
    ``out`` where given (x's shape, the last stride 1: e.g. the rope slice of MLA's decode query)."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.moeserve_cpu.rope_into(x, positions.long().contiguous(), cos, sin, interleave, out)
    return out


def write_kv_applies(kv_a: torch.Tensor, norm_weight: torch.Tensor, cache: torch.Tensor, cos: torch.Tensor) -> bool:
    """``write_kv_rows`` runs these: bfloat16 latent rows, norm weight and cache, float32 rotary tables, on a
    CPU with the kernels."""
    return (kv_a.device.type == "cpu" and kv_a.dtype == torch.bfloat16 and norm_weight.dtype == torch.bfloat16
            and cache.dtype == torch.bfloat16 and cos.dtype == torch.float32 and cache.is_contiguous() and kv_a.stride(-1) == 1
            and not torch.is_grad_enabled() and load_error() is None)


def write_kv_rows(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, interleave: bool, cache: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """A step's new latent rows into the paged cache in one call: ``cache[slots[t]] = (RMSNorm(latent_t) *
    norm_weight, rope(k_pe_t))`` for kv_a [T, kv_lora + rope] (the latent projection's output)."""
    torch.ops.moeserve_cpu.mla_write_kv(kv_a, norm_weight, eps, positions.long().contiguous(), cos, sin,
                                        interleave, cache, slots.long().contiguous())
