"""The CPU MoE kernel (kernels/cpu_moe.py) against a float32 reference of the routed experts and against the
loop of oneDNN products it replaces at decode sizes. Runs where the kernel builds and the CPU has AMX; skips
with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch

from moeserve.experts.moe import MoE
from moeserve.kernels import cpu_build, cpu_moe
from moeserve.model.config import ModelConfig

pytestmark = pytest.mark.skipif(not cpu_build.amx_tiles(),
                                reason=f"CPU MoE kernel unavailable: {cpu_build.status()}")


def moe_layer(num_experts: int, hidden: int, inter: int, top_k: int, seed: int = 0) -> MoE:
    config = ModelConfig.from_dict({
        "model_type": "deepseek_v2", "hidden_size": hidden, "moe_intermediate_size": inter,
        "n_routed_experts": num_experts,
        "num_experts_per_tok": top_k, "n_shared_experts": 0, "vocab_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
        "v_head_dim": 16, "intermediate_size": 64, "first_k_dense_replace": 1})
    layer = MoE(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.w13.copy_(torch.randn(layer.w13.shape, generator=gen) * 0.03)
        layer.w2.copy_(torch.randn(layer.w2.shape, generator=gen) * 0.03)
    return layer


def reference(layer: MoE, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """float32, pair by pair."""
    top_k = weights.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for pair, slot in enumerate(slots.tolist()):
        if slot == layer.num_local:
            continue
        t, k = divmod(pair, top_k)
        h = layer.w13[slot].float() @ x[t].float()
        gate, up = h.chunk(2)
        out[t] += weights[t, k] * (layer.w2[slot].float() @ (torch.nn.functional.silu(gate) * up))
    return out


def routing(tokens: int, num_experts: int, top_k: int, num_local: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    # experts past num_local are served elsewhere: their pairs carry the sentinel slot num_local
    slots = torch.where(ids < num_local, ids, torch.full_like(ids, num_local)).flatten()
    return weights, slots


@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 8, 2, 64, 32),        # one token: most experts idle
    (64, 16, 4, 256, 128),    # a decode batch
    (200, 4, 2, 64, 96),      # about 100 rows an expert: several blocks of 32 rows
])
def test_kernel_matches_float32_reference_and_the_loop(tokens, num_experts, top_k, hidden, inter):
    layer = moe_layer(num_experts, hidden, inter, top_k)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    weights, slots = routing(tokens, num_experts, top_k, layer.num_local, seed=2)
    with torch.inference_mode():
        got = layer.experts_cpu_kernel(x, weights, slots)
        loop = layer.experts_loop(x, weights, slots)
    want = reference(layer, x, weights, slots)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    scale = want.abs().max().item()
    kernel_err = (got.float() - want).abs().max().item()
    loop_err = (loop.float() - want).abs().max().item()
    # the kernel keeps float32 to the end (one bf16 rounding of the activation); the loop rounds each product
    assert kernel_err <= 0.01 * scale, (kernel_err, scale)
    assert kernel_err <= loop_err * 1.5 + 1e-6, (kernel_err, loop_err)


def test_pairs_served_elsewhere_are_left_out_and_rows_without_pairs_are_zero():
    layer = moe_layer(8, 64, 32, 2)
    x = torch.randn(6, 64).bfloat16()
    weights = torch.rand(6, 2)
    # tokens 0-2 have one pair here and one elsewhere (slot 8 = num_local); tokens 3-5 none here
    slots = torch.tensor([1, 8, 8, 3, 5, 8, 8, 8, 8, 8, 8, 8])
    with torch.inference_mode():
        got = layer.experts_cpu_kernel(x, weights, slots)
    want = reference(layer, x, weights, slots)
    assert torch.equal(got[3:], torch.zeros_like(got[3:]))
    assert (got.float() - want).abs().max() <= 0.01 * want.abs().max()


def test_packed_weights_follow_an_in_place_weight_change():
    """A rebalancer's expert move writes into w13/w2 in place: the next call must use the new weights."""
    layer = moe_layer(4, 64, 32, 2)
    x = torch.randn(8, 64).bfloat16()
    weights, slots = routing(8, 4, 2, 4, seed=3)
    with torch.inference_mode():
        before = layer.experts_cpu_kernel(x, weights, slots)
        layer.w13.mul_(2)
        after = layer.experts_cpu_kernel(x, weights, slots)
    want = reference(layer, x, weights, slots)
    assert not torch.allclose(before, after)
    assert (after.float() - want).abs().max() <= 0.01 * want.abs().max()


def test_decode_sized_bf16_steps_take_the_kernel_and_long_ones_the_loop():
    layer = moe_layer(16, 256, 128, 4)
    with torch.inference_mode():
        assert cpu_moe.applies(torch.zeros(64, 256, dtype=torch.bfloat16), 64 * 4, 16, 256, 128)
        assert not cpu_moe.applies(torch.zeros(4096, 256, dtype=torch.bfloat16), 4096 * 4, 16, 256, 128)
        assert not cpu_moe.applies(torch.zeros(64, 256), 64 * 4, 16, 256, 128)  # float32: the reference path
        assert not cpu_moe.applies(torch.zeros(64, 256, dtype=torch.bfloat16), 256, 16, 250, 128)
    assert layer.num_local == 16


def test_sort_pairs_is_the_stable_argsort_and_its_gathers():
    gen = torch.Generator().manual_seed(3)
    tokens, top_k, num_local = 9, 3, 5
    x = torch.randn(tokens, 64, generator=gen).bfloat16()
    weights = torch.rand(tokens, top_k, generator=gen)
    slots = torch.randint(0, num_local + 1, (tokens * top_k,), generator=gen)  # num_local: served elsewhere
    xs, offsets, pair_weights, pair_of = torch.ops.moeserve_cpu.sort_pairs(x, weights, slots, num_local)
    served = int((slots < num_local).sum())
    order = torch.argsort(slots, stable=True)[:served]
    counts = torch.bincount(slots, minlength=num_local + 1)[:num_local]
    assert torch.equal(offsets, torch.nn.functional.pad(counts.cumsum(0), (1, 0)))
    assert torch.equal(xs, x[order // top_k]) and torch.equal(pair_weights, weights.flatten()[order])
    want = torch.full((tokens * top_k,), -1)
    want[order] = torch.arange(served)
    assert torch.equal(pair_of.flatten(), want)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.moeserve_cpu.sort_pairs(x, weights, slots + num_local + 1, num_local)
