"""The small-batch MoE kernels, the expert-load counting kernel and the start-up check's judgement of them
(run by ``tests/test_kernels.py`` with the other kernel cases: on a GPU, or under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, _dequant, _eager_moe, _moe_case, rel_err, tol

from moeserve.kernels import triton_available
from moeserve.model.synthetic import tiny_config

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [(16, 128, 1, 4), (16, 64, 3, 4), (32, 128, 2, 8), (64, 32, 4, 2)])
@pytest.mark.parametrize("pieces", [0, 2])
def test_moe_gemv_configs(dtype, cfg, pieces):
    """Every tile and split of the split-K path computes the same function (odd sizes: ragged tiles), with
    and without the shared experts as extra pairs (``pieces`` routed-wide pieces a token)."""
    from moeserve.kernels.moe_gemv import GemvConfig, SharedWeights, moe_gemv

    hidden, inter = 200, 72
    x, w13, w2, _, _, weights, ids = _moe_case(dtype, 3, 7, 3, hidden=hidden, inter=inter)
    local_of = torch.tensor([0, 1, 7, 2, 3, 7, 4], device=DEVICE)  # two experts served elsewhere
    keep = torch.tensor([0, 1, 3, 4, 6], device=DEVICE)
    config = GemvConfig(*cfg)
    ref = _eager_moe(x, w13[keep], w2[keep], weights, ids, local_of.clamp(max=5))
    shared = None
    if pieces:
        gate_up = (torch.randn(2 * pieces * inter, hidden, device=DEVICE) / hidden ** 0.5).to(dtype)
        down = (torch.randn(hidden, pieces * inter, device=DEVICE) / (pieces * inter) ** 0.5).to(dtype)
        gate, up = (x.double() @ gate_up.double().T).chunk(2, -1)
        ref = ref + (torch.nn.functional.silu(gate) * up) @ down.double().T
        shared = SharedWeights(gate_up, down)
    out = moe_gemv(x, w13[keep], w2[keep], weights, local_of[ids.flatten()], 5, gate_up=config, down=config,
                   shared=shared)
    assert out.shape == x.shape and rel_err(out, ref) < tol(dtype)


def test_shared_experts_fold_into_the_kernel_where_they_cut_evenly():
    """The MoE layer adds its shared experts in the split-K kernel on steps of a few tokens, and the start-up
    check compares that sum with the eager one; a shared width that is no multiple of the routed one, a step
    on the split-K path with more than a few tokens, or a step on the sorted path keeps the shared MLP apart."""
    from moeserve.experts.moe import MoE
    from moeserve.kernels.moe_gemv import SharedWeights
    from moeserve.model.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.from_dict(tiny_config(n_shared_experts=2))
    moe = MoE(config, dtype=torch.float32).to(DEVICE).requires_grad_(False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, config.hidden_size, device=DEVICE)
    weights, ids = moe.route(x)
    assert moe.shared_in_kernel(x, ids.numel()) is None  # off until the start-up check turns it on
    moe.fused_shared = True
    shared = moe.shared_in_kernel(x, ids.numel())
    assert shared is not None and shared.pieces(config.moe_intermediate_size) == 2
    fused = moe.routed_and_shared_fused(x, weights, ids)
    assert fused is not None and rel_err(fused, moe.routed_and_shared_eager(x, weights, ids)) < 1e-5
    with torch.inference_mode():
        eager = moe(x)
        moe.fused = True
        assert rel_err(moe(x), eager) < 1e-5  # the layer's forward, shared experts in the kernel
    big = x.repeat(40, 1)
    assert moe.shared_in_kernel(big, big.shape[0] * config.num_experts_per_tok) is None  # the sorted path
    mid = x.repeat(2, 1)  # 6 tokens, 12 pairs: the split-K path, where each pair would read the shared weights
    assert moe.shared_in_kernel(mid, mid.shape[0] * config.num_experts_per_tok) is None
    # a tensor-parallel rank's share of one shared expert (half its width) is no whole piece
    half = SharedWeights(moe.shared_experts.gate_up_proj[:64], moe.shared_experts.down_proj[:, :32])
    assert half.pieces(config.moe_intermediate_size) == 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="float8 tensors need a GPU (the interpreter has no float8)")
@pytest.mark.parametrize("tokens,split_k", [(5, 1), (5, 4), (5, None), (70, None)],
                         ids=["split1", "split4", "few-pairs-tiles", "many-pairs-tiles"])
def test_moe_gemv_fp8(tokens, split_k):
    """FP8 experts read as stored, at given tiles and at the tiles ``gemv_configs`` picks for a few pairs and for
    many (70 tokens, 140 pairs: the narrower gate/up tiles)."""
    from moeserve.kernels.moe_gemv import FP8_MANY_PAIRS, GemvConfig, moe_gemv

    x, w13, w2, s13, s2, weights, ids = _moe_case(torch.bfloat16, tokens, 6, 2, hidden=512, inter=384, fp8=True)
    config = None if split_k is None else GemvConfig(16, 128, split_k, 4)
    assert split_k is not None or (ids.numel() >= FP8_MANY_PAIRS) == (tokens == 70)
    out = moe_gemv(x, w13, w2, weights, ids.flatten(), 6, s13, s2, (128, 128), gate_up=config, down=config)
    ref = _eager_moe(x, _dequant(w13, s13, True), _dequant(w2, s2, False), weights, ids,
                     torch.arange(6, device=DEVICE))
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("placement", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_expert_count_kernel(placement, padded):
    """The one-launch count gives the eager counter's counts, phases, slots and padding weights exactly."""
    from moeserve.experts.load_counter import ExpertLoadCounter

    phy2log = torch.tensor([[0, 1, 2, 5], [3, 4, 5, 1]]) if placement else None  # experts 1, 5 have copies
    counters = [ExpertLoadCounter([3, 4], 6, DEVICE, phy2log, fused=fused) for fused in (False, True)]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.randint(0, 6, (2000 + step, 2), generator=gen).to(DEVICE)
        weights = (torch.arange(ids.shape[0], device=DEVICE) < 1500).long() if padded else None
        for c in counters:
            c.begin_step(700)
            c.count(4 - step % 2, ids, first_token=11, weights=weights)
    eager, fused = counters
    assert torch.equal(eager.logical, fused.logical) and torch.equal(eager.physical, fused.physical)
    assert int(fused.logical.sum()) == (3 * 1500 * 2 if padded else (2000 + 2001 + 2002) * 2)
    assert (fused.physical is fused.logical) == (not placement)


@pytest.mark.parametrize("share_rank", [0, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_router_counts_as_it_routes(share_rank, padded):
    """The router kernel's own count (no EP placement) equals the counter's eager count of its picks, for
    this rank's share of the tokens, phases and padding weights included."""
    from moeserve.experts.gate import GateSpec
    from moeserve.experts.load_counter import ExpertLoadCounter
    from moeserve.kernels.router import fused_route

    spec = GateSpec(num_experts=64, scoring_func="sigmoid", topk_method="noaux_tc", top_k=6, n_group=8,
                    topk_group=4, norm_topk_prob=True)
    logits = torch.randn(37, 64, device=DEVICE)
    bias = torch.randn(64, device=DEVICE) * 0.1
    weights = (torch.arange(37, device=DEVICE) < 30).long() if padded else None
    fused, eager = (ExpertLoadCounter([5, 7], 64, DEVICE, share_rank=share_rank, share_size=2, fused=f)
                    for f in (True, False))
    for c in (fused, eager):
        c.begin_step(20)
    target = fused.router_target(7, 37, weights)
    assert target is not None
    _, ids, _ = fused_route(logits, spec, bias, target)
    first, n = eager.share(37)
    eager.count(7, ids[first:first + n], first, None if weights is None else weights[first:first + n])
    assert torch.equal(fused.logical, eager.logical) and int(fused.logical.sum()) > 0


@pytest.mark.parametrize("num_pairs,num_local,block_m", [(7, 5, 4), (384, 64, 32), (1000, 257, 16), (6, 64, 16),
                                                         (4096, 256, 32), (65, 3, 64)])
@pytest.mark.parametrize("hot", [False, True])
def test_align_kernel_matches_the_tensor_ops(num_pairs, num_local, block_m, hot, monkeypatch):
    """The one-launch alignment: the same runs, padding, block experts and row count as the tensor-op path.
    The order of the pairs inside a run may differ (a GPU's atomics hand out the rows), so an expert's run
    spanning several blocks is compared as a whole. ``hot``: half the pairs on one expert, as skewed routing
    does."""
    from moeserve.kernels import moe_align

    local = torch.randint(0, num_local + 1, (num_pairs,), device=DEVICE)  # num_local: served elsewhere
    if hot:
        local[::2] = num_local // 2
    pair_ids, block_expert, num_padded = moe_align.align_pairs(local, num_local, block_m)
    monkeypatch.setattr(moe_align, "MAX_PAIRS", 0)
    ref = moe_align.sort_pairs(local, num_local, block_m)
    used = int(ref.num_padded)
    assert int(num_padded) == used
    assert torch.equal(block_expert[:used // block_m], ref.block_expert[:used // block_m])
    # each row keyed by its block's expert, then its pair (padding rows: the pair count): the same keys means
    # every expert holds the same pairs and the same padding
    row_expert = ref.block_expert[:used // block_m].repeat_interleave(block_m)
    keys, ref_keys = (row_expert * (num_pairs + 1) + ids[:used] for ids in (pair_ids, ref.pair_ids))
    assert torch.equal(keys.sort().values, ref_keys.sort().values)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch.mm(..., out_dtype=) multiplies bf16 into float32 on CUDA")
def test_router_gemm_on_bf16_operands_gives_the_float32_logits():
    """A router weight that bf16 holds exactly is multiplied as bf16 (one tensor-core GEMM summing in float32):
    the float32 GEMM's logits up to the order of the sums. A weight bf16 cannot hold gets no copy."""
    from moeserve.experts.gate import exact_copy, router_logits

    w = torch.randn(64, 2048, device=DEVICE).bfloat16().float()
    x = torch.randn(37, 2048, device=DEVICE, dtype=torch.bfloat16)
    copy = exact_copy(w, torch.bfloat16)
    assert copy is not None and copy.dtype == torch.bfloat16
    assert exact_copy(w * (1 + 2 ** -12), torch.bfloat16) is None
    out, ref = router_logits(x, w, copy), router_logits(x, w)
    # the same products, summed in another order (cuBLAS's tiles and split-K): float32 rounding over 2048 terms,
    # a few 1e-6 at most; a bf16 rounding of either operand would be about 4e-3
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,hidden", [(1, 64, 2048), (3, 10, 200)])  # V2-Lite's router; ragged tiles
def test_router_logits_of_a_few_tokens_in_one_launch(dtype, tokens, experts, hidden):
    """The one-token steps' router logits (one launch: no cast of x, no float32 GEMM) equal the float32 product
    of x's values and the float32 weight up to float32 rounding."""
    from moeserve.experts.gate import router_logits
    from moeserve.kernels.router import router_logits_few

    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    w = torch.randn(experts, hidden, device=DEVICE) / hidden ** 0.5
    out = router_logits_few(x, w)
    assert out.shape == (tokens, experts) and out.dtype == torch.float32
    assert rel_err(out, router_logits(x, w)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,hidden", [(1, 64, 2048), (2, 10, 200)])
def test_norm_and_router_logits_in_one_launch(dtype, tokens, experts, hidden):
    """A one-token MoE step's input: the residual add and RMSNorm and the router's float32 logits of the normed
    row in one launch, against the norm kernel and the logits kernel one after the other (the same sum and
    rows, the logits up to float32 rounding) and against the eager ops."""
    from moeserve.experts.gate import router_logits
    from moeserve.kernels.rmsnorm import rms_norm
    from moeserve.kernels.router import norm_router_logits, router_logits_few
    from moeserve.model.layers import RMSNorm

    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    norm = RMSNorm(hidden, 1e-6, dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    w = torch.randn(experts, hidden, device=DEVICE) / hidden ** 0.5
    normed, total, logits = norm_router_logits(x, residual, norm.weight, norm.eps, w)
    ref_normed, ref_total = rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(total, ref_total) and torch.equal(normed, ref_normed)
    assert logits.shape == (tokens, experts) and rel_err(logits, router_logits_few(ref_normed, w)) < 1e-6
    with torch.no_grad():
        eager = norm(x + residual)
    assert rel_err(normed, eager) < tol(dtype) and rel_err(logits, router_logits(eager, w)) < tol(dtype)
