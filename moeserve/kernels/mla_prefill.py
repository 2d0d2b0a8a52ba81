"""MLA prefill attention over the expanded form, flash-attention style, for packed (varlen) sequences.

Reference: ``MLA._prefill_eager`` (``moeserve/model/mla.py``, the eager path): SDPA of each prefill chunk's
queries against its whole context -- the cached prefix and the chunk's own rows -- up-projected to per-head
keys ``[k_nope, k_pe]`` and values, under a causal mask offset by the prefix. Here a program takes
``BLOCK_M`` queries of one sequence and one head, walks the context in ``BLOCK_N`` rows with an online
softmax in float32, and writes its rows of the output: no mask and no score matrix beyond one
[BLOCK_M, BLOCK_N] tile exist, so a 32k-token context costs O(L) memory. ``k_pe`` [Nc, rope] is read once
per tile for every head (never expanded), and the score is the sum of the nope and the rope products.
Widths that are not powers of two are tiled padded to the next one, the padding masked off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import dot_precision, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, m_i, l_i, q_nope, q_pe, kn_ptr, kp_ptr, v_ptr, stride_kn, stride_kp, stride_v,
            lo, hi, q_pos, ctx, qk_scale, NOPE: tl.constexpr, ROPE: tl.constexpr, VDIM: tl.constexpr,
            NOPE_P: tl.constexpr, ROPE_P: tl.constexpr, V_P: tl.constexpr, BLOCK_N: tl.constexpr,
            CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Context rows [lo, hi) into the running (acc, m_i, l_i); ``CAUSAL``: mask rows past each query's
    position (and past the context), else every row is visible to every query of the tile."""
    d_n = tl.arange(0, NOPE_P)
    d_r = tl.arange(0, ROPE_P)
    d_v = tl.arange(0, V_P)
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < ctx
        jj = j.to(tl.int64)[:, None]  # row offsets past 2**31 elements at long contexts and many heads
        k_nope = tl.load(kn_ptr + jj * stride_kn + d_n[None, :],
                         mask=j_ok[:, None] & (d_n < NOPE)[None, :], other=0.0)  # [N, NOPE_P]
        k_pe = tl.load(kp_ptr + jj * stride_kp + d_r[None, :],
                       mask=j_ok[:, None] & (d_r < ROPE)[None, :], other=0.0)  # [N, ROPE_P]
        v = tl.load(v_ptr + jj * stride_v + d_v[None, :],
                    mask=j_ok[:, None] & (d_v < VDIM)[None, :], other=0.0)  # [N, V_P]
        s = tl.dot(q_nope, tl.trans(k_nope), input_precision=PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe.to(q_pe.dtype)), input_precision=PRECISION)
        s = s * qk_scale  # [M, N] float32, in log2 units
        if CAUSAL:
            s = tl.where((j[None, :] <= q_pos[:, None]) & j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# the per-sequence offsets are slices of the step metadata at any offset: not specialized on alignment
@triton.jit(do_not_specialize=["q_start_ptr", "ctx_start_ptr"])
def _mla_prefill(qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, out_ptr, q_start_ptr, ctx_start_ptr, qk_scale,
                 stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_knt, stride_knh, stride_kpt,
                 stride_vt, stride_vh, stride_ot, stride_oh,
                 NOPE: tl.constexpr, ROPE: tl.constexpr, VDIM: tl.constexpr, NOPE_P: tl.constexpr,
                 ROPE_P: tl.constexpr, V_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    # the longest (causal: the most work) query tiles first, for an even finish
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(q_start_ptr + b)
    q_len = tl.load(q_start_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx_start = tl.load(ctx_start_ptr + b)
    ctx = tl.load(ctx_start_ptr + b + 1) - ctx_start
    prefix = ctx - q_len  # query i sits at position prefix + i and sees context rows 0 ..= prefix + i
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < q_len
    q_pos = prefix + i
    rows = (q_start + i).to(tl.int64)
    d_n = tl.arange(0, NOPE_P)
    d_r = tl.arange(0, ROPE_P)
    d_v = tl.arange(0, V_P)
    q_nope = tl.load(qn_ptr + rows[:, None] * stride_qnt + h * stride_qnh + d_n[None, :],
                     mask=i_ok[:, None] & (d_n < NOPE)[None, :], other=0.0)  # [M, NOPE_P]
    q_pe = tl.load(qp_ptr + rows[:, None] * stride_qpt + h * stride_qph + d_r[None, :],
                   mask=i_ok[:, None] & (d_r < ROPE)[None, :], other=0.0)  # [M, ROPE_P]
    base = ctx_start.to(tl.int64)
    kn = kn_ptr + base * stride_knt + h * stride_knh
    kp = kp_ptr + base * stride_kpt
    vp = v_ptr + base * stride_vt + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, V_P], tl.float32)
    # rows before the tile's first position are visible to all its queries: no mask; then the diagonal
    # (every query row sees the first row of the masked part, so no row of the softmax is ever all -inf)
    first = prefix + tile * BLOCK_M
    full = (first // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend(acc, m_i, l_i, q_nope, q_pe, kn, kp, vp, stride_knt, stride_kpt, stride_vt,
                            0, full, q_pos, ctx, qk_scale, NOPE, ROPE, VDIM, NOPE_P, ROPE_P, V_P, BLOCK_N,
                            False, PRECISION)
    last = tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q_nope, q_pe, kn, kp, vp, stride_knt, stride_kpt, stride_vt,
                            full, last, q_pos, ctx, qk_scale, NOPE, ROPE, VDIM, NOPE_P, ROPE_P, V_P, BLOCK_N,
                            True, PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d_v[None, :],
             out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & (d_v < VDIM)[None, :])


def _padded(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def default_config(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): tiles for DeepSeek's widths (192 + 128) on an H100/H200,
    halved for float32 (twice the shared memory per row); smaller ones under the interpreter. On one H200
    (benchmarks/bench_mla_prefill.py, V2-Lite's 16 heads) three stages beat two at every size: 340-466
    TFLOP/s against 310-380."""
    if interpreting():
        return 32, 32, 4, 1
    return (64, 32, 4, 2) if dtype == torch.float32 else (128, 64, 8, 3)


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                v: torch.Tensor, query_start: torch.Tensor, context_start: torch.Tensor, max_query_len: int,
                scale: float, out: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention of packed prefill chunks over their packed contexts.

    q_nope [T, H, nope], q_pe [T, H, rope]: queries, sequence b's at rows ``query_start[b]:query_start[b+1]``
    ([Bp + 1], int); k_nope [Nc, H, nope], k_pe [Nc, rope] (one for all heads), v [Nc, H, v]: sequence b's
    context at rows ``context_start[b]:context_start[b+1]``, its prefix first and its new tokens last (query
    i of a sequence with context L and Q queries sees rows 0 ..= L - Q + i). Views with unit last stride.
    -> ``out`` [T, H, v] (q's dtype unless given; rows outside the sequences' are not written):
    softmax(scale * (q_nope . k_nope + q_pe . k_pe)) . v per head, in float32."""
    num_heads, nope, rope, v_dim = q_nope.shape[1], q_nope.shape[2], q_pe.shape[2], v.shape[2]
    tensors = (q_nope, q_pe, k_nope, k_pe, v)
    if any(t.stride(-1) != 1 for t in tensors):
        q_nope, q_pe, k_nope, k_pe, v = (t.contiguous() for t in tensors)
    if out is None:
        out = q_nope.new_empty(q_nope.shape[0], num_heads, v_dim)
    assert out.stride(-1) == 1, "out needs a unit last stride"
    block_m, block_n, num_warps, num_stages = config or default_config(q_nope.dtype)
    num_seqs = query_start.shape[0] - 1
    if num_seqs == 0 or max_query_len == 0:
        return out
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _mla_prefill[grid](
        q_nope, q_pe, k_nope, k_pe, v, out, query_start, context_start, scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        NOPE=nope, ROPE=rope, VDIM=v_dim, NOPE_P=_padded(nope), ROPE_P=_padded(rope), V_P=_padded(v_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q_nope.dtype), num_warps=num_warps,
        num_stages=num_stages)
    return out
