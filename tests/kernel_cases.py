"""Each fused kernel against the eager code it replaces (moeserve/kernels/*).

``tests/test_kernels.py`` runs this file in a process of its own: on a CUDA device, or, on machines without
one (CI), on the CPU under Triton's interpreter (float32 only, small shapes), whose ``TRITON_INTERPRET=1``
must be set before Triton is first imported. Inputs are fresh random data for every case.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels import kernels_apply, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")


def test_kernels_apply_here(monkeypatch) -> None:
    from moeserve.kernels import FUSED_KERNELS_ENV

    assert kernels_apply(DEVICE), "run on a CUDA device, or with TRITON_INTERPRET=1 (see tests/test_kernels.py)"
    monkeypatch.setenv(FUSED_KERNELS_ENV, "0")  # the user's switch: eager ops everywhere
    assert not kernels_apply(DEVICE)


DTYPES = [torch.float32] if DEVICE.type == "cpu" else [torch.float32, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def tol(dtype: torch.dtype) -> float:
    return 2e-3 if dtype == torch.float32 else 2e-2  # float32 dots may run as tf32 on tensor cores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    from moeserve.kernels.rmsnorm import rms_norm
    from moeserve.model.layers import RMSNorm

    norm = RMSNorm(96, 1e-6, dtype).to(DEVICE)
    norm.weight.data.normal_()
    x = torch.randn(7, 128, dtype=dtype, device=DEVICE)[:, :96]  # strided rows, as MLA's latent slice
    res = torch.randn(7, 96, dtype=dtype, device=DEVICE) if with_residual else None
    out, total = rms_norm(x, norm.weight, norm.eps, res)
    ref_total = x + res if res is not None else x
    assert rel_err(total, ref_total) == 0
    assert rel_err(out, norm(ref_total)) < (1e-5 if dtype == torch.float32 else 1e-2)


def _paged_case(dtype, lens, page, latent=64, rope=16, heads=20):
    """A random paged cache and the decode inputs of ``lens`` sequences (blocks scattered at random)."""
    num_blocks = sum(-(-n // page) for n in lens) + 3
    cache = torch.randn(num_blocks * page, latent + rope, dtype=dtype, device=DEVICE)
    perm = torch.randperm(num_blocks, device=DEVICE)
    width = max(-(-n // page) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.long, device=DEVICE)
    used = 0
    for b, n in enumerate(lens):
        k = -(-n // page)
        tables[b, :k] = perm[used:used + k]
        used += k
    q = torch.randn(len(lens), heads, latent + rope, dtype=dtype, device=DEVICE)
    return q, cache, tables, torch.tensor(lens, device=DEVICE)


def _eager_decode(q, cache, tables, lens, page, latent, scale):
    """MLA._decode's middle: gather whole blocks, mask past each length, softmax, weighted latents."""
    rows = cache.view(-1, page * cache.shape[-1])[tables].view(q.shape[0], -1, cache.shape[-1])
    scores = torch.bmm(q, rows.transpose(1, 2)).float() * scale
    valid = torch.arange(rows.shape[1], device=DEVICE).unsqueeze(0) < lens.unsqueeze(1)
    scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))
    return torch.bmm(scores.softmax(-1).to(rows.dtype), rows)[..., :latent]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 4, 32])  # 32: the merge sums the partial rows in two blocks of 16
@pytest.mark.parametrize("latent,rope", [(64, 16), (96, 32), (40, 8)])  # 96 + 32: the embedded model's
def test_mla_decode(dtype, splits, latent, rope):
    from moeserve.kernels.mla_decode import mla_decode

    page, lens = 16, [1, 37, 16, 100]
    q, cache, tables, ctx = _paged_case(dtype, lens, page, latent, rope)
    out = mla_decode(q, cache, tables, ctx, page, latent, 0.3, num_splits=splits)
    assert out.shape == (len(lens), q.shape[1], latent) and out.dtype == dtype
    assert rel_err(out, _eager_decode(q, cache, tables, ctx, page, latent, 0.3)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [64, 72])  # DeepSeek-V2/V3's head counts take 64 heads a program
def test_mla_decode_wide_heads(dtype, heads):
    from moeserve.kernels.mla_decode import DEFAULT, WIDE_HEADS, config_for, mla_decode

    assert config_for(heads, 3) is WIDE_HEADS and config_for(heads, 1) is DEFAULT  # one sequence: 16 heads a program
    page, lens = 16, [1, 37, 100]
    q, cache, tables, ctx = _paged_case(dtype, lens, page, 64, 16, heads=heads)
    out = mla_decode(q, cache, tables, ctx, page, 64, 0.3)
    assert rel_err(out, _eager_decode(q, cache, tables, ctx, page, 64, 0.3)) < tol(dtype)


def _moe_case(dtype, num_tokens, num_experts, top_k, hidden=128, inter=64, fp8=False):
    from moeserve.model.fp8 import FP8_DTYPE

    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE) / inter ** 0.5
    ids = torch.stack([torch.randperm(num_experts, device=DEVICE)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    if not fp8:
        return x, w13.to(dtype), w2.to(dtype), None, None, weights, ids
    s13 = torch.rand(num_experts, 2, -(-inter // 128), -(-hidden // 128), device=DEVICE) + 0.5
    s2 = torch.rand(num_experts, -(-hidden // 128), -(-inter // 128), device=DEVICE) + 0.5
    return x, w13.to(FP8_DTYPE), w2.to(FP8_DTYPE), s13, s2, weights, ids


def _eager_moe(x, w13, w2, weights, ids, local_of):
    """MoE.routed's math, one token and pair at a time: sum of weight * down(silu(gate) * up)."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            slot = int(local_of[ids[t, k]])
            if slot >= w13.shape[0]:
                continue
            gate, up = (w13[slot].double() @ x[t].double()).chunk(2)
            out[t] += float(weights[t, k]) * (w2[slot].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def _dequant(w, scale, gated):
    from moeserve.model.fp8 import dequantize_into

    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    if gated:
        halves = (w.shape[0], 2, w.shape[1] // 2, w.shape[2])
        dequantize_into(out.view(halves), w.view(halves), scale, (128, 128))
        return out
    return dequantize_into(out, w, scale, (128, 128))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,held", [(1, "all"), (5, "half"), (70, "half")])
@pytest.mark.parametrize("path", ["gemv", "sorted"])
def test_fused_moe(dtype, num_tokens, held, path):
    from moeserve.kernels import fused_moe as kernels

    fused_moe = kernels.moe_gemv if path == "gemv" else kernels.fused_moe_sorted
    num_experts, top_k = 8, 3
    x, w13, w2, _, _, weights, ids = _moe_case(dtype, num_tokens, num_experts, top_k)
    # expert parallel: this rank holds experts 1, 3, 5, 7 in slots 0..3; the others' pairs are skipped
    local_of = torch.arange(num_experts, device=DEVICE) if held == "all" else \
        torch.tensor([4, 0, 4, 1, 4, 2, 4, 3], device=DEVICE)
    num_local = num_experts if held == "all" else 4
    keep = torch.arange(num_experts, device=DEVICE)[local_of < num_local]
    out = fused_moe(x, w13[keep], w2[keep], weights, local_of[ids.flatten()], num_local)
    ref = _eager_moe(x, w13[keep], w2[keep], weights, ids, local_of)
    assert out.shape == x.shape and rel_err(out, ref) < tol(dtype)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="float8 tensors need a GPU (the interpreter has no float8)")
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 300])
def test_fused_moe_fp8(num_tokens):
    from moeserve.kernels.fused_moe import fused_moe  # 1 and 7 tokens: the matrix-vector path

    num_experts, top_k = 6, 2
    x, w13, w2, s13, s2, weights, ids = _moe_case(torch.bfloat16, num_tokens, num_experts, top_k, hidden=256,
                                                  inter=384, fp8=True)
    out = fused_moe(x, w13, w2, weights, ids.flatten(), num_experts, s13, s2, (128, 128))
    ref = _eager_moe(x, _dequant(w13, s13, True), _dequant(w2, s2, False), weights, ids,
                     torch.arange(num_experts, device=DEVICE))
    assert rel_err(out, ref) < 2e-2


def test_sort_pairs_pads_each_expert_run():
    from moeserve.kernels.moe_align import sort_pairs

    local = torch.tensor([2, 0, 2, 5, 2, 1, 5], device=DEVICE)  # 5 = served elsewhere (num_local = 5)
    pairs = sort_pairs(local, 5, 4)
    used = int(pairs.num_padded)
    assert used == 12  # experts 0, 1, 2 each padded to one block of 4
    ids = pairs.pair_ids[:used].view(3, 4).sort(1).values.tolist()  # any order inside an expert's run
    assert ids == [[1, 7, 7, 7], [5, 7, 7, 7], [0, 2, 4, 7]]
    assert pairs.block_expert[:3].tolist() == [0, 1, 2]




@pytest.mark.parametrize("spec_kw", [
    dict(scoring_func="softmax", topk_method="greedy", top_k=6),
    dict(scoring_func="softmax", topk_method="group_limited_greedy", top_k=3, n_group=4, topk_group=2),
    dict(scoring_func="sigmoid", topk_method="noaux_tc", top_k=8, n_group=8, topk_group=4, norm_topk_prob=True,
         routed_scaling_factor=2.5),
])
def test_router(spec_kw):
    from moeserve.experts.gate import GateSpec, route
    from moeserve.kernels.router import fused_route

    spec = GateSpec(num_experts=64, **spec_kw)
    logits = torch.randn(37, 64, device=DEVICE) * 3
    bias = torch.randn(64, device=DEVICE) * 0.1 if spec.topk_method == "noaux_tc" else None
    weights, ids, slots = fused_route(logits, spec, bias)
    assert slots is None
    ref_w, ref_ids = route(logits, spec, bias)
    # the same experts with the same weights, in whatever order each side lists them
    order, ref_order = ids.sort(1), ref_ids.sort(1)
    assert torch.equal(order.values, ref_order.values)
    assert rel_err(weights.gather(1, order.indices), ref_w.gather(1, ref_order.indices)) < 1e-5
    # with a slot table, each pair's slot is looked up in the same launch (a table sending half the experts away)
    table = torch.where(torch.arange(64, device=DEVICE) % 2 == 0, torch.arange(64, device=DEVICE) // 2, 32)
    _, ids2, slots2 = fused_route(logits, spec, bias, slot_map=table)
    assert torch.equal(ids2, ids) and slots2 is not None and torch.equal(slots2, table[ids.flatten()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    """SwiGLU's activation in one launch against the eager silu and product (strided rows, a width that is
    not a power of two)."""
    from moeserve.kernels.activation import silu_and_mul
    from moeserve.model.cpu_linear import silu_and_mul as eager

    h = torch.randn(9, 2 * 1408 + 64, dtype=dtype, device=DEVICE)[:, 64:] * 3
    out = silu_and_mul(h)
    assert out.shape == (9, 1408) and out.dtype == dtype
    assert rel_err(out, eager(h.clone())) < (1e-6 if dtype == torch.float32 else 1e-2)
