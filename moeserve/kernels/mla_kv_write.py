"""A step's new latent rows into MLA's paged cache in one kernel: RMSNorm of the latent, rotation of the
decoupled key, the scatter to each token's cache row (the eager path: a norm, a rotation, a concatenation
and an index copy, four launches a layer). In a decode step the same launch rotates the queries' rope parts
and, for a few queries, absorbs their no-rope parts by W_UK (``write_kv_rows``'s ``q_rope`` and ``q_absorb``).

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

from moeserve.kernels.pdl import pdl_args, pdl_enter
from moeserve.kernels.rope import rotated


@triton.jit
def _kv_rows(kv_ptr, norm_w_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, stride_kv, stride_cache,
             stride_table, eps, q_ptr, q_out_ptr, num_q, num_heads, stride_qt, stride_qh, stride_ot, stride_oh,
             num_rows, qn_ptr, w_uk_ptr, lat_ptr, stride_nt, stride_nh, stride_wh, stride_wn, stride_lt, stride_lh,
             nope, LORA: tl.constexpr, LORA_BLOCK: tl.constexpr, HALF: tl.constexpr, INTERLEAVE: tl.constexpr,
             HAS_Q: tl.constexpr, BLOCK_H: tl.constexpr, ABSORB: tl.constexpr, NOPE_P: tl.constexpr,
             BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    if pid < num_rows:
        _kv_row(pid.to(tl.int64), kv_ptr, norm_w_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, stride_kv,
                stride_cache, stride_table, eps, q_ptr, q_out_ptr, num_q, num_heads, stride_qt, stride_qh, stride_ot,
                stride_oh, LORA, LORA_BLOCK, HALF, INTERLEAVE, HAS_Q, BLOCK_H)
    elif ABSORB:  # the programs past the rows: one (query, head, BLOCK_C latent columns) each
        a = pid - num_rows
        blocks = tl.cdiv(LORA, BLOCK_C)
        t = (a // (num_heads * blocks)).to(tl.int64)
        h = (a // blocks) % num_heads
        c = (a % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < LORA
        n = tl.arange(0, NOPE_P)
        n_ok = n < nope
        qn = tl.load(qn_ptr + t * stride_nt + h * stride_nh + n, mask=n_ok, other=0.0).to(tl.float32)
        w = tl.load(w_uk_ptr + h * stride_wh + n[:, None] * stride_wn + c[None, :],
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [NOPE_P, BLOCK_C]
        tl.store(lat_ptr + t * stride_lt + h * stride_lh + c, tl.sum(qn[:, None] * w, 0).to(lat_ptr.dtype.element_ty),
                 mask=c_ok)


@triton.jit
def _kv_row(t, kv_ptr, norm_w_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, stride_kv, stride_cache,
            stride_table, eps, q_ptr, q_out_ptr, num_q, num_heads, stride_qt, stride_qh, stride_ot, stride_oh,
            LORA: tl.constexpr, LORA_BLOCK: tl.constexpr, HALF: tl.constexpr, INTERLEAVE: tl.constexpr,
            HAS_Q: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token ``t``'s cache row, and its query's rope part where it is one of the first ``num_q``."""
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
    if HAS_Q:  # the first num_q tokens' query rope parts too (kernels/rope.py's _rope, at the same position)
        if t < num_q:
            q_dtype = q_out_ptr.dtype.element_ty
            for h0 in range(0, num_heads, BLOCK_H):
                heads = h0 + tl.arange(0, BLOCK_H)
                h_ok = heads[:, None] < num_heads
                q_first, q_second = rotated(q_ptr + t * stride_qt + heads[:, None] * stride_qh, cos[None, :],
                                            sin[None, :], i[None, :], h_ok, HALF, INTERLEAVE)
                out = q_out_ptr + t * stride_ot + heads[:, None] * stride_oh
                tl.store(out + i[None, :], q_first.to(q_dtype), mask=h_ok)
                tl.store(out + HALF + i[None, :], q_second.to(q_dtype), mask=h_ok)


ABSORB_BLOCK_C = 32  # latent columns a query-absorbing program computes: 16 programs a head at kv_lora 512


def write_kv_rows(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, interleave: bool, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, q_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                  q_absorb: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """kv_a: [T, kv_lora + rope] (rows may be strided, the last stride 1), the latent projection's output;
    norm_weight: [kv_lora]; positions, slot_mapping: [T]; cos/sin: [P, rope / 2] float32; kv_cache:
    [num_slots, kv_lora + rope] (flat view). Writes each token's normalised latent and rotated key.

    ``q_rope``: (q_pe [Tq, H, rope], out [Tq, H, rope]), both with the last stride 1, Tq <= T: the first Tq
    tokens' query rope parts rotated into ``out`` in the same launch (``rope(q_pe, positions[:Tq], out=out)``,
    bit for bit): a decode step's query, whose rotation would otherwise be a launch of its own.

    ``q_absorb``: (q_nope [Tq, H, nope], w_uk [H, nope, kv_lora], out [Tq, H, kv_lora]), each with the last
    stride 1: the same queries' absorbed latent parts, ``torch.bmm(q_nope.transpose(0, 1), w_uk)`` (float32
    sums, rounded once), by extra programs of the same launch; for a few queries, since each program reads its
    head's weight columns (a batched GEMM reads them once for every query)."""
    tokens = kv_a.shape[0]
    lora = norm_weight.shape[0]
    half = (kv_a.shape[1] - lora) // 2
    q, q_out = q_rope if q_rope is not None else (kv_a.unsqueeze(1), kv_a.unsqueeze(1))  # unread placeholders
    assert q_rope is None or (q.shape == q_out.shape and q.shape[0] <= tokens and q.shape[2] == 2 * half
                              and q.stride(-1) == 1 and q_out.stride(-1) == 1)
    qn, w_uk, lat = q_absorb if q_absorb is not None else (kv_a.unsqueeze(1), kv_a.unsqueeze(1), kv_a.unsqueeze(1))
    absorbing = 0
    if q_absorb is not None:
        assert qn.shape[0] <= tokens and w_uk.shape == (qn.shape[1], qn.shape[2], lora) \
            and lat.shape == (qn.shape[0], qn.shape[1], lora) and w_uk.stride(2) == 1 and lat.stride(2) == 1 \
            and qn.stride(2) == 1 and (q_rope is None or q.shape[:2] == qn.shape[:2])
        absorbing = qn.shape[0] * qn.shape[1] * triton.cdiv(lora, ABSORB_BLOCK_C)
    if tokens:
        _kv_rows[(tokens + absorbing,)](
            kv_a, norm_weight, positions, cos, sin, slot_mapping, kv_cache, kv_a.stride(0), kv_cache.stride(0),
            cos.stride(0), eps, q, q_out, q.shape[0] if q_rope else 0, qn.shape[1] if q_absorb else q.shape[1],
            q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1), tokens, qn, w_uk, lat, qn.stride(0),
            qn.stride(1), w_uk.stride(0), w_uk.stride(1), lat.stride(0), lat.stride(1), qn.shape[2], LORA=lora,
            LORA_BLOCK=triton.next_power_of_2(lora), HALF=half, INTERLEAVE=interleave, HAS_Q=q_rope is not None,
            BLOCK_H=min(16, triton.next_power_of_2(q.shape[1])), ABSORB=q_absorb is not None,
            NOPE_P=triton.next_power_of_2(qn.shape[2]) if q_absorb else 16, BLOCK_C=ABSORB_BLOCK_C,
            num_warps=min(8, max(1, triton.next_power_of_2(lora) // 256)), enable_fp_fusion=False,
            **pdl_args(kv_a.device))
