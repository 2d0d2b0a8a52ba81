"""The CPU kernels around MLA's attention (kernels/cpu/mla_prologue.cpp) against the eager ops they replace:
the rotary embedding (``RotaryEmbedding.forward`` with autograd on takes the eager path) and the latent cache
write (RMSNorm of the latent, rotated rope part, ``index_copy_``), both layouts of the rope pairs, strided
inputs and outputs as MLA passes them. Skips with the reason where the CPU kernels do not build."""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels import cpu_build, cpu_mla
from moeserve.model.config import RopeConfig
from moeserve.model.layers import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(cpu_build.load_error() is not None,
                                reason=f"CPU kernels unavailable: {cpu_build.status()}")


def bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one bf16 rounding step (float32 products summed in another order) in rare elements."""
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2 ** -7 + 1e-6).all(), float(diff.max())
    assert (diff == 0).float().mean() > 0.99


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_eager(interleave: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    rotary = RotaryEmbedding(RopeConfig(interleave=interleave, rope_type="yarn", factor=4.0,
                                        original_max_position_embeddings=64), 64, 256)
    q = torch.randn(37, 8, 192, generator=gen).bfloat16()
    q_pe = q[..., 128:]  # a strided view, as MLA splits it
    positions = torch.randint(0, 256, (37,), generator=gen)
    with torch.enable_grad():  # the eager ops
        want = rotary(q_pe, positions)
    with torch.no_grad():
        assert cpu_mla.rope_applies(q_pe, rotary.cos) and not cpu_mla.rope_applies(q_pe, rotary.cos.bfloat16())
        got = rotary(q_pe, positions)
        buffer = torch.zeros(37, 8, 576, dtype=torch.bfloat16)
        rotary(q_pe, positions, out=buffer[..., 512:])  # into the rope slice of the decode query
        got_2d = rotary(q_pe[:, 0].contiguous(), positions)
    bf16_close(got, want)
    assert torch.equal(buffer[..., 512:], got) and not buffer[..., :512].any()
    assert torch.equal(got_2d, got[:, 0])


def test_rope_rejects_a_position_past_the_table() -> None:
    rotary = RotaryEmbedding(RopeConfig(), 16, 32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="position out of the rotary table"):
        rotary(torch.zeros(2, 16, dtype=torch.bfloat16), torch.tensor([0, 32]))


def test_rope_in_place_only_for_the_split_layout() -> None:
    """Interleaved pairs land where later pairs are still to be read: an ``out`` overlapping ``x`` is refused
    there. The split layout reads and writes the same two places of a row, so ``out=x`` rotates in place, and
    only that: an ``out`` shifted within the same buffer is refused too."""
    gen = torch.Generator().manual_seed(3)
    rotary = RotaryEmbedding(RopeConfig(), 64, 32)
    x = torch.randn(5, 4, 64, generator=gen).bfloat16()
    positions = torch.randint(0, 32, (5,), generator=gen)
    with torch.no_grad():
        want = cpu_mla.rope_into(x, positions, rotary.cos, rotary.sin, interleave=False)
        in_place = x.clone()
        cpu_mla.rope_into(in_place, positions, rotary.cos, rotary.sin, interleave=False, out=in_place)
        assert torch.equal(in_place, want)
        buffer = torch.zeros(5, 4, 96, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="out overlaps x"):
            cpu_mla.rope_into(x, positions, rotary.cos, rotary.sin, interleave=True, out=x)
        with pytest.raises(RuntimeError, match="out overlaps x"):  # partly: shifted by 32 values in one buffer
            cpu_mla.rope_into(buffer[..., :64], positions, rotary.cos, rotary.sin, interleave=True,
                              out=buffer[..., 32:])
        with pytest.raises(RuntimeError, match="other than exactly in place"):  # the split layout, shifted
            cpu_mla.rope_into(buffer[..., :64], positions, rotary.cos, rotary.sin, interleave=False,
                              out=buffer[..., 32:])


@pytest.mark.parametrize("interleave", [True, False])
def test_cache_write_matches_eager(interleave: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    kv_lora, rope, tokens, slots_total = 512, 64, 21, 96
    rotary = RotaryEmbedding(RopeConfig(interleave=interleave), rope, 128)
    norm = RMSNorm(kv_lora, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(kv_lora, generator=gen) + 0.5)
    fused = torch.randn(tokens, 1536 + kv_lora + rope, generator=gen).bfloat16()
    kv_a = fused[:, 1536:]  # rows of the fused input projection's output: row stride past the width
    positions = torch.randint(0, 128, (tokens,), generator=gen)
    slots = torch.randperm(slots_total, generator=gen)[:tokens]
    want = torch.zeros(slots_total, kv_lora + rope, dtype=torch.bfloat16)
    got = torch.zeros_like(want)
    with torch.enable_grad():
        latent, k_pe = kv_a.split([kv_lora, rope], dim=-1)
        want.index_copy_(0, slots, torch.cat([norm(latent.contiguous()), rotary(k_pe, positions)], dim=-1))
    with torch.no_grad():
        assert cpu_mla.write_kv_applies(kv_a, norm.weight, got, rotary.cos)
        cpu_mla.write_kv_rows(kv_a, norm.weight, norm.eps, positions, rotary.cos, rotary.sin, interleave, got, slots)
    bf16_close(got[slots], want[slots])
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert not got[untouched].any()
    with torch.no_grad(), pytest.raises(RuntimeError, match="slot out of the cache"):
        cpu_mla.write_kv_rows(kv_a, norm.weight, norm.eps, positions, rotary.cos, rotary.sin, interleave, got,
                              torch.full((tokens,), slots_total))


def test_float32_and_autograd_keep_the_eager_path() -> None:
    x = torch.zeros(4, 2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not cpu_mla.rope_applies(x.float(), torch.ones(4, 8))
        assert not cpu_mla.write_kv_applies(x[:, 0].float(), torch.ones(8), torch.zeros(4, 16), torch.ones(4, 4))
    with torch.enable_grad():
        assert not cpu_mla.rope_applies(x, torch.ones(4, 8))
