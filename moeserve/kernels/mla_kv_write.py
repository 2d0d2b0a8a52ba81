"""A step's new latent rows into MLA's paged cache in one kernel: RMSNorm of the latent, rotation of the
decoupled key, the scatter to each token's cache row (the eager path: a norm, a rotation, a concatenation
and an index copy, four launches a layer).

Reference: ``MLA.forward``'s eager rows, ``cat([kv_a_layernorm(latent), rotary(k_pe)])`` written with
``index_copy_`` at ``slot_mapping``. Rounding follows the eager ops: the normalised row is rounded to the
input dtype before the weight multiplies it, each rotated value is rounded once, and the row is rounded to the
cache's dtype last. Compiled without fused multiply-adds, as ``kernels/rope.py`` is, so that the rotation
matches its reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.rope import rotated


@triton.jit
def _kv_rows(kv_ptr, norm_w_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, stride_kv, stride_cache,
             stride_table, eps, LORA: tl.constexpr, LORA_BLOCK: tl.constexpr, HALF: tl.constexpr,
             INTERLEAVE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    dtype = kv_ptr.dtype.element_ty
    cache_dtype = cache_ptr.dtype.element_ty
    row = kv_ptr + t * stride_kv
    dst = cache_ptr + tl.load(slot_ptr + t).to(tl.int64) * stride_cache
    cols = tl.arange(0, LORA_BLOCK)
    ok = cols < LORA
    x = tl.load(row + cols, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / LORA + eps)
    normed = (x * inv).to(dtype).to(tl.float32)
    w = tl.load(norm_w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst + cols, (normed * w).to(dtype).to(cache_dtype), mask=ok)
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_table + i)
    sin = tl.load(sin_ptr + pos * stride_table + i)
    first, second = rotated(row + LORA, cos, sin, i, i < HALF, HALF, INTERLEAVE)
    tl.store(dst + LORA + i, first.to(dtype).to(cache_dtype))
    tl.store(dst + LORA + HALF + i, second.to(dtype).to(cache_dtype))


def write_kv_rows(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, interleave: bool, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """kv_a: [T, kv_lora + rope] (rows may be strided, the last stride 1), the latent projection's output;
    norm_weight: [kv_lora]; positions, slot_mapping: [T]; cos/sin: [P, rope / 2] float32; kv_cache:
    [num_slots, kv_lora + rope] (flat view). Writes each token's normalised latent and rotated key."""
    tokens = kv_a.shape[0]
    lora = norm_weight.shape[0]
    half = (kv_a.shape[1] - lora) // 2
    if tokens:
        _kv_rows[(tokens,)](kv_a, norm_weight, positions, cos, sin, slot_mapping, kv_cache, kv_a.stride(0),
                            kv_cache.stride(0), cos.stride(0), eps, LORA=lora,
                            LORA_BLOCK=triton.next_power_of_2(lora), HALF=half, INTERLEAVE=interleave,
                            num_warps=min(8, max(1, triton.next_power_of_2(lora) // 256)),
                            enable_fp_fusion=False)
