"""The MLA prefill kernel (moeserve/kernels/mla_prefill.py) against the eager SDPA, and the model's prefill
with it against the eager model; RoPE and the one-launch cache write (``rope.py``, ``mla_kv_write.py``) against
their eager rows. Run as ``kernel_cases.py`` is (see ``tests/test_kernels.py``): on a CUDA device, or on the
CPU under Triton's interpreter at small sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, rel_err

from moeserve.kernels import triton_available
from moeserve.model.synthetic import tiny_config

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")
GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if GPU else [torch.float32]
# (nope, rope, v): the tiny test model's, the embedded default model's, DeepSeek-V2/V3's (head_dim 192 / 128)
WIDTHS = [(32, 16, 32), (32, 32, 64), (128, 64, 128)]
# (cached prefix, new tokens) per sequence: lengths off the tiles, prefixes, a chunk shorter than its prefix
SEQS = [[(0, 37)], [(0, 5), (0, 40), (23, 17), (64, 33)], [(100, 20), (7, 1)]]
LONG = [(0, 1000), (3000, 700), (513, 2048)]  # on a GPU, at DeepSeek's widths
if GPU:
    SEQS.append(LONG)


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2  # float32 products run exact ("ieee")


def _varlen_case(dtype, seqs, widths, heads=4, num_decode=3):
    """Packed queries (after ``num_decode`` rows that belong to no sequence) and packed contexts."""
    nope, rope, v_dim = widths
    q_lens = torch.tensor([n for _, n in seqs], device=DEVICE)
    ctx_lens = torch.tensor([p + n for p, n in seqs], device=DEVICE)
    query_start = F.pad(torch.cumsum(q_lens, 0), (1, 0)) + num_decode
    context_start = F.pad(torch.cumsum(ctx_lens, 0), (1, 0))
    num_tokens, num_ctx = int(query_start[-1]), int(context_start[-1])
    q = torch.randn(num_tokens, heads, nope + rope, dtype=dtype, device=DEVICE)
    kv = torch.randn(num_ctx, heads, nope + v_dim, dtype=dtype, device=DEVICE)
    rows = torch.randn(num_ctx, 96 + rope, dtype=dtype, device=DEVICE)  # a latent cache row: k_pe is its tail
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    return q_nope, q_pe, k_nope, rows[:, 96:], v, query_start, context_start


def _sdpa_reference(q_nope, q_pe, k_nope, k_pe, v, query_start, context_start, scale):
    """MLA._prefill_eager's attention, one sequence at a time, in float64: [T, H, v] (other rows zero)."""
    heads = q_nope.shape[1]
    out = torch.zeros(q_nope.shape[0], heads, v.shape[2], dtype=torch.float64, device=DEVICE)
    for b in range(query_start.shape[0] - 1):
        qs, qe, cs, ce = (int(x) for x in (query_start[b], query_start[b + 1], context_start[b],
                                            context_start[b + 1]))
        q = torch.cat([q_nope[qs:qe], q_pe[qs:qe]], dim=-1).transpose(0, 1).double()  # [H, Q, qk]
        k = torch.cat([k_nope[cs:ce], k_pe[cs:ce].unsqueeze(1).expand(-1, heads, -1)], dim=-1)
        i = torch.arange(qe - qs, device=DEVICE).unsqueeze(1) + (ce - cs) - (qe - qs)
        mask = torch.arange(ce - cs, device=DEVICE).unsqueeze(0) <= i  # [Q, L]
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1).double(), v[cs:ce].transpose(0, 1).double(),
                                           attn_mask=mask, scale=scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("seqs", SEQS, ids=lambda s: f"{len(s)}seq-{s[0][0]}+{s[0][1]}")
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_mla_prefill(dtype, widths, seqs, tiles):
    from moeserve.kernels.mla_prefill import default_config, mla_prefill

    if seqs is LONG and widths != WIDTHS[-1]:
        pytest.skip("the long case at DeepSeek's widths only")
    config = default_config(dtype) if tiles == "default" else (16, 16, 2, 1)
    q_nope, q_pe, k_nope, k_pe, v, query_start, context_start = _varlen_case(dtype, seqs, widths)
    out = torch.full((q_nope.shape[0], q_nope.shape[1], widths[2]), 7.0, dtype=dtype, device=DEVICE)
    max_q = max(n for _, n in seqs)
    mla_prefill(q_nope, q_pe, k_nope, k_pe, v, query_start, context_start, max_q, 0.2, out=out, config=config)
    ref = _sdpa_reference(q_nope, q_pe, k_nope, k_pe, v, query_start, context_start, 0.2)
    first = int(query_start[0])
    assert bool((out[:first] == 7.0).all())  # rows before the sequences' (the decode rows) untouched
    assert rel_err(out[first:], ref[first:]) < tol(dtype)


def _tiny_model(mla_dims):
    from moeserve.model.config import ModelConfig
    from moeserve.model.deepseek import DeepseekModel
    from moeserve.model.synthetic import init_random_

    config = ModelConfig.from_dict(tiny_config(**mla_dims))
    return init_random_(DeepseekModel(config).to(DEVICE), seed=4, std=0.2)


@pytest.mark.parametrize("mla_dims", [{}, dict(kv_lora_rank=96, qk_rope_head_dim=32, v_head_dim=64)],
                         ids=["tiny", "embedded"])
@torch.no_grad()
def test_model_prefill_with_the_kernel_matches_eager(mla_dims, monkeypatch):
    """Logits of every token, float32: two prompts in one step, then a mixed step (a decode, the second
    chunk of a prompt over its cached prefix, a new prompt), with the MLA kernels and with the eager ops."""
    from moeserve.model.attn_metadata import build_attn_metadata
    from moeserve.model.mla import MLA

    model = _tiny_model(mla_dims)
    block_size, num_blocks = 8, 32
    tables = torch.arange(num_blocks, device=DEVICE).view(4, 8)
    gen = torch.Generator().manual_seed(5)
    steps = [([0, 0], [13, 21]), ([13, 21, 0], [1, 30, 9])]  # (num_computed, query_lens) per step
    tokens = [torch.randint(2, 256, (sum(q),), generator=gen).to(DEVICE) for _, q in steps]
    outs = {}
    for fused in (False, True):
        if fused:  # the kernel runs, not the eager fallback
            monkeypatch.setattr(MLA, "_prefill_eager", lambda *a: pytest.fail("eager prefill with the kernel on"))
        for layer in model.decoder_layers().values():
            layer.self_attn.fused = fused
        caches = {int(i): torch.zeros(num_blocks * block_size, model.config.kv_cache_dim, device=DEVICE)
                  for i in model.layers}
        logits = []
        for (computed, q_lens), ids in zip(steps, tokens):
            rows = tables[:len(q_lens)]
            meta = build_attn_metadata(rows, torch.tensor(computed, device=DEVICE),
                                       torch.tensor(q_lens, device=DEVICE), block_size)
            logits.append(model(ids, meta, caches, all_logits=True))
        outs[fused] = torch.cat(logits)
    assert rel_err(outs[True], outs[False]) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", [True, False])
def test_rope(dtype, interleave):
    from moeserve.kernels.rope import rope
    from moeserve.model.config import RopeConfig
    from moeserve.model.layers import RotaryEmbedding

    rotary = RotaryEmbedding(RopeConfig(rope_type="default", theta=10000.0, interleave=interleave), 16, 64)
    rotary = rotary.to(DEVICE)
    q = torch.randn(5, 6, 48, dtype=dtype, device=DEVICE)[..., 32:]  # the rope slice of q: strided
    k = torch.randn(5, 80, dtype=dtype, device=DEVICE)[:, 64:]  # k_pe: [T, rope] slice of the kv_a output
    pos = torch.tensor([0, 3, 7, 63, 20], device=DEVICE)
    for x in (q, k):
        out = rope(x, pos, rotary.cos, rotary.sin, interleave)
        assert out.shape == x.shape and rel_err(out, rotary(x, pos)) < (1e-6 if dtype == torch.float32 else 1e-2)
    wide = torch.zeros(5, 6, 40, dtype=dtype, device=DEVICE)  # written in place: the rope part of a wider buffer
    assert rope(q, pos, rotary.cos, rotary.sin, interleave, out=wide[..., 24:]).data_ptr() == wide[..., 24:].data_ptr()
    assert torch.equal(wide[..., 24:], rope(q, pos, rotary.cos, rotary.sin, interleave))
    assert not wide[..., :24].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", [True, False])
def test_kv_rows_written_as_the_eager_ops_write_them(dtype, interleave):
    """The one-launch cache write (norm of the latent, rotation of k_pe, scatter to the token's slot) against
    the eager rows: the same rows, rounded alike; other slots untouched."""
    from moeserve.kernels.mla_kv_write import write_kv_rows
    from moeserve.model.config import RopeConfig
    from moeserve.model.layers import RMSNorm, RotaryEmbedding

    lora, rope_dim = 96, 32  # a latent width that is not a power of two (the embedded model's)
    rotary = RotaryEmbedding(RopeConfig(rope_type="default", theta=10000.0, interleave=interleave), rope_dim, 64)
    rotary = rotary.to(DEVICE)
    norm = RMSNorm(lora, 1e-6, dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    kv_a = torch.randn(5, 200 + lora + rope_dim, dtype=dtype, device=DEVICE)[:, 200:]  # a slice of the projection
    pos = torch.tensor([0, 3, 7, 63, 20], device=DEVICE)
    slots = torch.tensor([9, 2, 30, 17, 4], device=DEVICE)
    cache = torch.full((32, lora + rope_dim), 7.0, dtype=dtype, device=DEVICE)
    ref = cache.clone()
    latent, k_pe = kv_a.split([lora, rope_dim], -1)
    with torch.no_grad():
        ref.index_copy_(0, slots, torch.cat([norm(latent), rotary(k_pe, pos)], -1))
        write_kv_rows(kv_a, norm.weight, norm.eps, pos, rotary.cos, rotary.sin, interleave, cache, slots)
    untouched = torch.ones(32, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert bool((cache[untouched] == 7.0).all())
    assert rel_err(cache[slots], ref[slots]) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [3, 20])  # 20: two blocks of 16 heads
def test_kv_rows_rotate_the_decode_queries_too(dtype, heads):
    """A decode step's cache write also rotates the first tokens' query rope parts into a wider buffer: bit for
    bit the rope kernel's output, the buffer's other columns and the other tokens' rows untouched."""
    from moeserve.kernels.mla_kv_write import write_kv_rows
    from moeserve.kernels.rope import rope

    lora, rope_dim, nope = 64, 16, 24
    rotary, norm, kv_a, pos, slots, q = _decode_rows_case(dtype, lora, rope_dim, nope, heads)
    q_pe = q[..., nope:]  # a strided slice of q
    q_full = torch.full((3, heads, lora + rope_dim), 5.0, dtype=dtype, device=DEVICE)  # 3 decode tokens
    cache = torch.zeros(8, lora + rope_dim, dtype=dtype, device=DEVICE)
    alone = cache.clone()
    with torch.no_grad():
        write_kv_rows(kv_a, norm.weight, norm.eps, pos, rotary.cos, rotary.sin, True, cache, slots,
                      q_rope=(q_pe[:3], q_full[..., lora:]))
        write_kv_rows(kv_a, norm.weight, norm.eps, pos, rotary.cos, rotary.sin, True, alone, slots)
    assert torch.equal(cache, alone)  # the cache rows are the same either way
    assert torch.equal(q_full[..., lora:], rope(q_pe[:3], pos[:3], rotary.cos, rotary.sin, True))
    assert bool((q_full[..., :lora] == 5.0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [64, 96])  # 96: the embedded model's (not a power of two: masked columns)
def test_kv_rows_absorb_the_decode_queries_too(dtype, lora):
    """With the queries' no-rope parts and W_UK, extra programs of the cache-write launch write each decode
    query's absorbed latent part (``torch.bmm(q_nope, W_UK)``) beside its rotated rope part; the cache rows and
    the rope parts are the same as without them."""
    from moeserve.kernels.mla_kv_write import write_kv_rows
    from moeserve.kernels.rope import rope

    rope_dim, nope, heads = 16, 24, 3
    rotary, norm, kv_a, pos, slots, q = _decode_rows_case(dtype, lora, rope_dim, nope, heads)
    q_nope, q_pe = q[..., :nope], q[..., nope:]  # both parts strided slices of q
    w_uk = (torch.randn(heads, nope, lora, device=DEVICE) / nope ** 0.5).to(dtype)
    q_full = torch.full((3, heads, lora + rope_dim), 5.0, dtype=dtype, device=DEVICE)  # 3 decode tokens
    cache = torch.zeros(8, lora + rope_dim, dtype=dtype, device=DEVICE)
    alone = cache.clone()
    with torch.no_grad():
        write_kv_rows(kv_a, norm.weight, norm.eps, pos, rotary.cos, rotary.sin, True, cache, slots,
                      q_rope=(q_pe[:3], q_full[..., lora:]), q_absorb=(q_nope[:3], w_uk, q_full[..., :lora]))
        write_kv_rows(kv_a, norm.weight, norm.eps, pos, rotary.cos, rotary.sin, True, alone, slots)
    assert torch.equal(cache, alone)
    assert torch.equal(q_full[..., lora:], rope(q_pe[:3], pos[:3], rotary.cos, rotary.sin, True))
    ref = torch.bmm(q_nope[:3].transpose(0, 1).float(), w_uk.float()).transpose(0, 1)
    assert rel_err(q_full[..., :lora], ref) < tol(dtype)


def _decode_rows_case(dtype, lora, rope_dim, nope, heads):
    """A decode step's cache-write inputs for 5 tokens: (rotary, latent norm, kv_a, positions, slots, q)."""
    from moeserve.model.config import RopeConfig
    from moeserve.model.layers import RMSNorm, RotaryEmbedding

    rotary = RotaryEmbedding(RopeConfig(rope_type="default", theta=10000.0, interleave=True), rope_dim, 64).to(DEVICE)
    norm = RMSNorm(lora, 1e-6, dtype).to(DEVICE)
    kv_a = torch.randn(5, lora + rope_dim, dtype=dtype, device=DEVICE)
    pos = torch.tensor([4, 9, 63, 0, 20], device=DEVICE)
    slots = torch.tensor([1, 2, 3, 4, 5], device=DEVICE)
    q = torch.randn(5, heads, nope + rope_dim, dtype=dtype, device=DEVICE)
    return rotary, norm, kv_a, pos, slots, q
