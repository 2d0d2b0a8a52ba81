"""Absorbed MLA decode attention over the paged latent cache, split along the sequence (flash decoding).

Reference: the middle of ``MLA._decode`` (``moeserve/model/mla.py``, the eager path): scores of the absorbed
query against every cached row (latent and rope parts together), softmax, and the probability-weighted sum
of the cached latents. The kernel reads each sequence's rows through its block table, only up to its
context length (read on the device, so a CUDA graph replays it for any length), in ``num_splits`` pieces
whose partial results are merged by their log-sum-exp in a second small kernel. Latent and rope widths
that are not powers of two (the embedded default model's kv_lora_rank 96) are tiled padded to the next one,
the padding masked off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels import dot_precision
from moeserve.kernels.pdl import pdl_args, pdl_enter

HEAD_BLOCK = 16  # heads per program: the smallest M of a tensor-core product


@dataclass(frozen=True)
class DecodeConfig:
    token_block: int = 32  # cached rows per loop step
    num_warps: int = 4
    num_stages: int = 2
    fill: int = 2  # programs per SM the split count aims for (at most max_splits)
    head_block: int = HEAD_BLOCK  # heads per program (the products' M)
    max_splits: int = 16  # pieces a sequence may be split into (a power of two)


# NOTE: benchmarks/bench_mla_decode.py found 64-row steps with 3 stages 8-12% faster at V2-Lite's batch 256
# and V3's batch 32 (scattered pages), but the engine's decode profiles on the same H200 showed no gain
# (1.85 against 1.84 ms a V2-Lite step at 256, 0.61 against 0.60 for V3 at 32): the default stays
DEFAULT = DecodeConfig()
# 64 or more heads (DeepSeek-V2/V3's 128): 64 heads a program, so each cached row loaded feeds a wider product.
# bench_mla_decode.py on one H200, V3's 128 heads at batch 32: 0.066 against the default's 0.090 ms a layer.
# From WIDE_HEADS_BATCH sequences on: at one sequence 16 heads a program (8 head blocks of 16 splits, not 2)
# took 0.0106 against 0.0136 ms a layer on one H100 (--shapes v3-small); at 4 the two were even
WIDE_HEADS = DecodeConfig(token_block=64, num_warps=8, num_stages=2, head_block=64)
WIDE_HEADS_BATCH = 2


def config_for(num_heads: int, batch: int) -> DecodeConfig:
    """The tiles for a step of ``batch`` sequences over a layer of ``num_heads`` query heads."""
    return WIDE_HEADS if num_heads >= WIDE_HEADS.head_block and batch >= WIDE_HEADS_BATCH else DEFAULT


@triton.jit(do_not_specialize=["tables_ptr", "lens_ptr", "stride_tb"])
def _mla_decode_split(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, scale,
                      num_heads, stride_qb, stride_qh, stride_tb, stride_ob, stride_oh, stride_os,
                      NUM_SPLITS: tl.constexpr, PAGE: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr,
                      LATENT_P: tl.constexpr, ROPE_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                      PRECISION: tl.constexpr, FINAL: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    d_lat = tl.arange(0, LATENT_P)  # padded to a power of two; columns past LATENT (ROPE) load zeros
    d_pe = tl.arange(0, ROPE_P)
    lat_ok = d_lat < LATENT
    pe_ok = d_pe < ROPE
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + d_lat[None, :], mask=head_ok[:, None] & lat_ok[None, :], other=0.0)  # [H, LATENT_P]
    q_pe = tl.load(q_row + LATENT + d_pe[None, :], mask=head_ok[:, None] & pe_ok[None, :], other=0.0)
    ctx = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT_P], tl.float32)
    row_width = LATENT + ROPE
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        block = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=t_ok, other=0)
        slot = block.to(tl.int64) * PAGE + t % PAGE
        rows = cache_ptr + slot[:, None] * row_width
        k_lat = tl.load(rows + d_lat[None, :], mask=t_ok[:, None] & lat_ok[None, :], other=0.0)  # [T, LATENT_P]
        k_pe = tl.load(rows + LATENT + d_pe[None, :], mask=t_ok[:, None] & pe_ok[None, :], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION) \
            + tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION)  # [H, T] float32
        s = tl.where(t_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=PRECISION)
        m_i = m_new
    out_row = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
    has = l_i > 0
    # FINAL (one split): the output itself, in its dtype (what the merge of one part would write); else a part
    tl.store(out_row + d_lat[None, :], (acc / tl.where(has, l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & lat_ok[None, :])
    if not FINAL:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + (b * num_heads + heads) * NUM_SPLITS + split, lse, mask=head_ok)


@triton.jit
def _mla_decode_merge(part_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
                      num_heads, NUM_SPLITS: tl.constexpr, SPLIT_BLOCK: tl.constexpr, LATENT: tl.constexpr,
                      LATENT_P: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    lse_row = lse_ptr + (b * num_heads + h) * NUM_SPLITS
    lse = tl.load(lse_row + s)  # [S]
    m = tl.max(lse, 0)
    total = tl.sum(tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0), 0)
    d = tl.arange(0, LATENT_P)
    d_ok = d < LATENT
    out = tl.zeros([LATENT_P], tl.float32)
    # the partial rows SPLIT_BLOCK at a time: a block of [S, LATENT_P] float32 in registers at most
    for s0 in range(0, NUM_SPLITS, SPLIT_BLOCK):
        sb = s0 + tl.arange(0, SPLIT_BLOCK)
        lse_b = tl.load(lse_row + sb)
        w = tl.where(lse_b > float("-inf"), tl.exp(lse_b - m), 0.0) / total
        parts = tl.load(part_ptr + b * stride_pb + h * stride_ph + sb[:, None] * stride_ps + d[None, :],
                        mask=d_ok[None, :], other=0.0)
        out += tl.sum(parts * w[:, None], 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def padded(width: int) -> int:
    """The tile width of a latent or rope part: the next power of two, at least 16 (a tensor-core K)."""
    return max(16, triton.next_power_of_2(width))


def num_splits_for(batch: int, num_heads: int, num_sms: int = 132, fill: int = DEFAULT.fill,
                   head_block: int = HEAD_BLOCK, max_splits: int = DEFAULT.max_splits) -> int:
    """Pieces each sequence is split into: enough programs for ``fill`` per SM, at most ``max_splits``."""
    programs = batch * triton.cdiv(num_heads, head_block)
    splits = max(1, min(max_splits, (fill * num_sms) // max(programs, 1)))
    return 1 << (splits.bit_length() - 1)  # a power of two (the merge kernel's arange)


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               page_size: int, latent_dim: int, scale: float, num_splits: int | None = None,
               config: DecodeConfig | None = None) -> torch.Tensor:
    """q: [B, H, latent + rope] absorbed queries; cache: [num_slots, latent + rope] (flat paged rows);
    block_tables: [B, max_blocks] (entries past a sequence's length are never read); context_lens: [B]
    (>= 1) -> [B, H, latent] in q's dtype: softmax(scale * q . rows) . rows[:, :latent]."""
    batch, num_heads, width = q.shape
    rope = width - latent_dim
    # one table dtype (the CUDA graphs' int32) for every caller: a second would be a second compiled variant,
    # built the first time an eager step decodes
    block_tables = block_tables.to(torch.int32)
    config = config or config_for(num_heads, batch)
    splits = num_splits or num_splits_for(batch, num_heads, fill=config.fill, head_block=config.head_block,
                                          max_splits=config.max_splits)
    out = torch.empty(batch, num_heads, latent_dim, dtype=q.dtype, device=q.device)
    final = splits == 1  # one piece a sequence (a large batch): the split kernel writes the output, no merge
    parts = out.unsqueeze(2) if final else \
        torch.empty(batch, num_heads, splits, latent_dim, dtype=torch.float32, device=q.device)
    lse = parts if final else torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    grid = (batch, triton.cdiv(num_heads, config.head_block), splits)
    _mla_decode_split[grid](
        q, cache, block_tables, context_lens, parts, lse, scale, num_heads,
        q.stride(0), q.stride(1), block_tables.stride(0), parts.stride(0), parts.stride(1), parts.stride(2),
        NUM_SPLITS=splits, PAGE=page_size, LATENT=latent_dim, ROPE=rope, LATENT_P=padded(latent_dim),
        ROPE_P=padded(rope), BLOCK_H=config.head_block, BLOCK_T=config.token_block, PRECISION=dot_precision(q.dtype),
        FINAL=final, num_warps=config.num_warps, num_stages=config.num_stages, **pdl_args(q.device))
    if final:
        return out
    _mla_decode_merge[(batch, num_heads)](
        parts, lse, out, parts.stride(0), parts.stride(1), parts.stride(2), out.stride(0), out.stride(1),
        num_heads, NUM_SPLITS=splits, SPLIT_BLOCK=min(splits, 16), LATENT=latent_dim, LATENT_P=padded(latent_dim),
        num_warps=4, **pdl_args(q.device))
    return out
