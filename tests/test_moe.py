"""The MoE layer: expert grouping, placement slices, the grouped-GEMM path, the token counter."""

from __future__ import annotations

import pytest
import torch

from moeserve.experts.gate import GateSpec, route
from moeserve.experts.moe import ExpertPlacement, MoE
from moeserve.model.config import ModelConfig

RAW = {"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
       "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "n_shared_experts": 1,
       "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "kv_lora_rank": 16,
       "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}


def make(placement: ExpertPlacement | None = None, dtype=torch.float32) -> MoE:
    torch.manual_seed(0)
    moe = MoE(ModelConfig.from_dict(RAW), placement, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.e_score_correction_bias.normal_(0, 0.1)
    return moe


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition."""
    weights, ids = route(x.float() @ moe.gate_weight.float().T, moe.spec, moe.e_score_correction_bias)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t]):
            g, u = (moe.w13[int(e)] @ x[t]).chunk(2)
            out[t] += w * (moe.w2[int(e)] @ (torch.nn.functional.silu(g) * u))
    return out + moe.shared_experts(x)


def test_grouped_by_expert_equals_definition() -> None:
    moe = make()
    x = torch.randn(37, 32)
    torch.testing.assert_close(moe(x), naive(moe, x), rtol=1e-5, atol=1e-5)
    assert int(moe.tokens_per_expert.sum()) == 37 * 3


def test_expert_slices_sum_to_whole() -> None:
    whole = make()
    x = torch.randn(20, 32)
    weights, ids = route(x @ whole.gate_weight.T, whole.spec, whole.e_score_correction_bias)
    parts = []
    for rank in range(4):
        part = make(ExpertPlacement.contiguous(8, rank, 4))
        with torch.no_grad():
            part.w13.copy_(whole.w13[rank * 2:(rank + 1) * 2])
            part.w2.copy_(whole.w2[rank * 2:(rank + 1) * 2])
        parts.append(part.routed(x, weights, ids))
    torch.testing.assert_close(sum(parts), whole.routed(x, weights, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_rank", [[[0, 1, 2, 3, 7], [4, 5, 6, 7, 0]],
                                      [[0, 1, 7], [2, 3, 0], [4, 5, 1], [6, 7, 2]]])
@pytest.mark.parametrize("grouped", [False, True])
def test_redundant_copies_count_each_pair_once(per_rank: list[list[int]], grouped: bool) -> None:
    """Experts with copies on several ranks: the ranks' partial sums (what the all-reduce adds) still equal
    the whole layer, because each (token, expert) pair is served by exactly one copy."""
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    whole = make()
    x = torch.randn(23, 32)
    weights, ids = route(x @ whole.gate_weight.T, whole.spec, whole.e_score_correction_bias)
    parts = []
    for rank, logical in enumerate(per_rank):
        placement = ExpertPlacement.from_ranks(per_rank, rank)
        assert placement.has_copies
        part = make(placement)
        with torch.no_grad():
            part.w13.copy_(whole.w13[logical])
            part.w2.copy_(whole.w2[logical])
        parts.append((part.routed_grouped if grouped else part.routed)(x, weights, ids))
    torch.testing.assert_close(sum(parts), whole.routed(x, weights, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", [None, ExpertPlacement(8, (5, 1, 6))])
def test_grouped_gemm_path_equals_loop(placement) -> None:
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    moe = make(placement)
    x = torch.randn(29, 32)
    weights, ids = route(x @ moe.gate_weight.T, moe.spec, moe.e_score_correction_bias)
    torch.testing.assert_close(moe.routed_grouped(x, weights, ids), moe.routed(x, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_noaux_bias_selects_but_does_not_weigh() -> None:
    spec = GateSpec(num_experts=4, top_k=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                    topk_group=2, routed_scaling_factor=2.0)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    w, ids = route(logits, spec, torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert ids.tolist() == [[3]]
    assert w.item() == pytest.approx(2.0 * torch.sigmoid(torch.tensor(0.0)).item())


def test_group_limited_keeps_best_groups() -> None:
    spec = GateSpec(num_experts=6, top_k=2, topk_method="group_limited_greedy", n_group=3, topk_group=1)
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0, 0.0, 2.8]])  # group 0 holds the max; 2.9 is in group 1
    _, ids = route(logits, spec)
    assert sorted(ids[0].tolist()) in ([0, 1], [1, 0])
