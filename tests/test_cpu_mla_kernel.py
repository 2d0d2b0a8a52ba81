"""The CPU MLA decode kernel (kernels/cpu_mla.py) against the absorbed attention in float32 over a gathered
context: contexts of one token to several online-softmax chunks, more heads than one group, blocks scattered
through the cache. Runs where the CPU kernels build with AVX-512 BF16; skips with the reason elsewhere."""

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


@pytest.mark.parametrize("heads,lens,kv_lora,rope", [
    (8, [1, 17, 64, 65, 150], 512, 64),   # DeepSeek's widths; one token to three chunks of 64
    (20, [33, 200], 64, 32),              # two head groups (16 + 4)
    (3, [5, 90], 48, 16),                 # widths that are not multiples of the vector length
])
def test_kernel_matches_float32_reference(heads, lens, kv_lora, rope):
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 64
    width = kv_lora + rope
    cache = torch.randn(num_blocks * block_size, width, generator=gen).bfloat16()
    max_blocks = -(-max(lens) // block_size) + 1  # a padding column past every context
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in lens])
    context_lens = torch.tensor(lens)
    q = torch.randn(len(lens), heads, width, generator=gen).bfloat16()
    scale = width ** -0.5
    with torch.inference_mode():
        assert cpu_mla.applies(q, cache)
        got = cpu_mla.mla_decode(q, cache, tables, context_lens, block_size, kv_lora, scale)
    want = reference(q, cache, tables, context_lens, block_size, kv_lora, scale)
    assert got.shape == (len(lens), heads, kv_lora) and got.dtype == torch.bfloat16
    assert torch.isfinite(got.float()).all()
    # bf16 output rounding (2^-8 relative) on values of at most max |row|
    assert (got.float() - want).abs().max() <= 0.01 * cache.float().abs().max()


def test_float32_and_autograd_keep_the_eager_path():
    q, cache = torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not cpu_mla.applies(q.float(), cache.float())
    with torch.enable_grad():
        assert not cpu_mla.applies(q, cache)
