"""The CPU MLA decode kernel (kernels/cpu_mla.py), both its paths -- AMX tiles where they were built and the
shapes fit, AVX-512 BF16 -- against the absorbed attention in float32 over a gathered context: contexts of one
token to several chunks and tiles, more heads than one group, blocks scattered through the cache, and NaN in
every cache row no context covers (rows a tile reads past a context must not leak into the result). Runs where
the CPU kernels build with AVX-512 BF16; skips with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels import cpu_build, cpu_mla

pytestmark = pytest.mark.skipif(not cpu_build.mla_vectorized(),
                                reason=f"CPU MLA kernel unavailable: {cpu_build.status()}")


def reference(q, cache, block_tables, context_lens, block_size, kv_lora, scale):
    out = []
    for b, length in enumerate(context_lens.tolist()):
        pos = torch.arange(length)
        rows = cache[block_tables[b, pos // block_size] * block_size + pos % block_size].float()  # [L, D]
        probs = (q[b].float() @ rows.T * scale).softmax(-1)  # [H, L]
        out.append(probs @ rows[:, :kv_lora])
    return torch.stack(out)


@pytest.mark.parametrize("tiles", [True, False], ids=["amx-where-it-fits", "avx512"])
@pytest.mark.parametrize("heads,lens,kv_lora,rope", [
    (8, [1, 16, 17, 32, 33, 64, 65, 150], 512, 64),  # DeepSeek's widths: partial and whole tiles and chunks
    (16, [31, 200], 128, 64),                          # a whole tile of heads
    (5, [40, 7], 128, 64),                             # part of a tile's columns
    (20, [33, 200], 64, 32),                           # two head groups (16 + 4): AVX-512 only
    (3, [5, 90], 48, 16),                              # widths that are not multiples of the vector length
])
def test_kernel_matches_float32_reference(heads, lens, kv_lora, rope, tiles):
    gen = torch.Generator().manual_seed(0)
    block_size = 16
    width = kv_lora + rope
    max_blocks = -(-max(lens) // block_size) + 1  # a padding column past every context
    num_blocks = len(lens) * max_blocks
    cache = torch.randn(num_blocks * block_size, width, generator=gen).bfloat16()
    tables = torch.randperm(num_blocks, generator=gen).view(len(lens), max_blocks)  # no block shared
    covered = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for b, length in enumerate(lens):
        pos = torch.arange(length)
        covered[tables[b, pos // block_size] * block_size + pos % block_size] = True
    cache[~covered] = float("nan")
    context_lens = torch.tensor(lens)
    q = torch.randn(len(lens), heads, width, generator=gen).bfloat16()
    scale = width ** -0.5
    with torch.inference_mode():
        assert cpu_mla.applies(q, cache)
        got = cpu_mla.mla_decode(q, cache, tables, context_lens, block_size, kv_lora, scale, tiles=tiles)
    want = reference(q, cache, tables, context_lens, block_size, kv_lora, scale)
    assert got.shape == (len(lens), heads, kv_lora) and got.dtype == torch.bfloat16
    assert torch.isfinite(got.float()).all()
    # bf16 output rounding (2^-8 relative) on values of at most max |row|
    assert (got.float() - want).abs().max() <= 0.01 * cache[covered].float().abs().max()


@pytest.mark.skipif(not cpu_build.mla_tiles() or not cpu_build.amx_tiles(),
                    reason=f"needs the AMX paths: {cpu_build.status()}")
def test_tile_kernel_leaves_oneDNN_and_the_expert_kernel_exact():
    """The tile path configures the tile unit for itself: oneDNN's products and PyTorch's micro-kernel (the
    expert kernel) called before and after it, on the same threads, give the same bits."""
    from moeserve.kernels import cpu_moe
    from moeserve.model.cpu_linear import PackedLinear

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 256, generator=gen).bfloat16()
    w = torch.randn(512, 256, generator=gen).bfloat16()
    w13 = torch.randn(4, 256, 256, generator=gen).bfloat16() * 0.05
    w2 = torch.randn(4, 256, 128, generator=gen).bfloat16() * 0.05
    packs = cpu_moe.pack_experts(w13), cpu_moe.pack_experts(w2)
    weights = torch.rand(48, 2, generator=gen)
    slots = torch.randint(0, 4, (96,), generator=gen)
    linear = PackedLinear()
    q = torch.randn(8, 8, 576, generator=gen).bfloat16()
    cache = torch.randn(64 * 16, 576, generator=gen).bfloat16()
    tables = torch.arange(64).view(8, 8)
    lens = torch.full((8,), 100)

    def others():
        return linear(x, w, "w"), cpu_moe.routed_experts(x, weights, slots, 4, *packs)

    with torch.inference_mode():
        before = others()
        cpu_mla.mla_decode(q, cache, tables, lens, 16, 512, 0.05)
        after = others()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_float32_and_autograd_keep_the_eager_path():
    q, cache = torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not cpu_mla.applies(q.float(), cache.float())
    with torch.enable_grad():
        assert not cpu_mla.applies(q, cache)
