"""The parallel plan and the topology: pure units, sizes against the real model, and the ``plan`` command."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.comm.shard import ShardInfo
from moeserve.comm.topology import ParallelDims
from moeserve.coordinator.config import default_model_path
from moeserve.coordinator.plan import (
    InfeasiblePlanError,
    ParallelPlan,
    compact_ranges,
    expert_placement,
    format_plan,
    layer_costs,
    make_plan,
    parse_pp_layers,
    split_layers,
)
from moeserve.experts.moe import ExpertPlacement
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel, ModelSlice

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128,
    "vocab_size": 129280,
}


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return ModelConfig.from_hf(default_model_path())


def v2_style(tiny: ModelConfig) -> ModelConfig:
    """No q_lora, tied embeddings, MoE every other layer, softmax gate without correction bias."""
    return tiny.replace(q_lora_rank=None, tie_word_embeddings=True, moe_layer_freq=2, first_k_dense_replace=0,
                        scoring_func="softmax", topk_method="greedy", n_shared_experts=2)


def model_bytes(config: ModelConfig, model_slice: ModelSlice | None = None) -> int:
    """Bytes of the real model's persistent tensors (parameters and checkpoint buffers), built on meta."""
    with torch.device("meta"):
        model = DeepseekModel(config, model_slice, dtype=torch.bfloat16, max_positions=16)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- topology ----

@pytest.mark.parametrize("kwargs, match", [
    ({"pp": 0}, "pp must be"), ({"tp": -1}, "tp must be"), ({"replicas": 0}, "replicas must be"),
    ({"ep": True}, "ep must be"), ({"tp": 4, "ep": 2}, r"ep must be 1 .* equal to tp \(4"),
])
def test_dims_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_dims_rank_maps() -> None:
    dims = ParallelDims.from_args(pp=3, tp=4, replicas=2)
    assert (dims.ep, dims.world_size, dims.ranks_per_replica, dims.ep_group_size) == (4, 24, 12, 4)
    for rank in range(dims.world_size):
        c = dims.coord(rank)
        assert dims.rank_of(c.replica, c.pp_stage, c.tp_rank) == rank
        assert rank in dims.tp_group_ranks(rank) == dims.ep_group_ranks(rank)
        assert dims.ep_rank(rank) == c.tp_rank
    assert dims.coord(17) == dims.coord(17).__class__(replica=1, pp_stage=1, tp_rank=1)
    assert dims.stage_ranks(1, 2) == [20, 21, 22, 23]
    assert dims.pp_peer(17, +1) == 21 and dims.pp_peer(17, -1) == 13
    assert dims.pp_peer(13, -1) is None and dims.pp_peer(21, +1) is None
    assert dims.is_first_stage(13) and dims.is_last_stage(21) and not dims.is_last_stage(17)
    with pytest.raises(ValueError, match="rank must be in 0..23"):
        dims.coord(24)
    with pytest.raises(ValueError, match="direction"):
        dims.pp_peer(0, 2)
    tp_only = ParallelDims(pp=2, tp=2, ep=1)
    assert tp_only.ep_group_ranks(3) == [3] and tp_only.tp_group_ranks(3) == [2, 3] and tp_only.ep_rank(3) == 0


# ---- layer split ----

def brute_force_bottleneck(costs: list[int], pp: int, first: int, last: int) -> int:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), pp - 1):
        bounds = [0, *cuts, len(costs)]
        stage = [sum(costs[bounds[k]:bounds[k + 1]]) for k in range(pp)]
        stage[0] += first
        stage[-1] += last
        best = max(stage) if best is None else min(best, max(stage))
    assert best is not None
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=9), st.data(), st.integers(0, 40), st.integers(0, 40))
def test_split_layers_is_optimal(costs: list[int], data: st.DataObject, first: int, last: int) -> None:
    pp = data.draw(st.integers(1, len(costs)))
    split = split_layers([float(c) for c in costs], pp, first, last)
    assert len(split) == pp and sum(split) == len(costs) and min(split) >= 1
    ends = list(itertools.accumulate(split))
    stage = [sum(costs[end - n:end]) for n, end in zip(split, ends)]
    stage[0] += first
    stage[-1] += last
    assert max(stage) == brute_force_bottleneck(costs, pp, first, last)
    assert split == split_layers([float(c) for c in costs], pp, first, last)  # deterministic


def test_split_layers_balances_and_shifts_for_extras() -> None:
    assert split_layers([1.0] * 27, 2) == [14, 13]
    assert split_layers([1.0] * 8, 2) == [4, 4]
    assert split_layers([1.0] * 8, 2, last_extra=2.0) == [5, 3]
    assert split_layers([1.0] * 8, 2, first_extra=2.0) == [3, 5]
    assert split_layers([10.0, 1, 1, 1, 1], 3) == [1, 2, 2]  # off-bottleneck stages balanced too
    with pytest.raises(InfeasiblePlanError, match="cannot split 3 layers into 4"):
        split_layers([1.0] * 3, 4)


def test_layer_costs_read_top_k_experts(tiny: ModelConfig) -> None:
    costs = layer_costs(tiny)  # layer 0 dense; 1..4 MoE with 1 shared + top-2 of 8 routed experts
    assert len(costs) == 5 and len(set(costs[1:])) == 1
    h = tiny.hidden_size
    assert costs[0] - costs[1] == 3 * h * tiny.intermediate_size - (8 * h + 3 * 3 * h * tiny.moe_intermediate_size)


def test_parse_pp_layers() -> None:
    assert parse_pp_layers("14, 13", 27, 2) == [14, 13]
    for text, match in [("14,12", "sums to 26"), ("27", "1 stage"), ("27,0", "at least one"),
                        ("14,x", "comma-separated")]:
        with pytest.raises(ValueError, match=match):
            parse_pp_layers(text, 27, 2)


# ---- expert placement ----

def test_placement_default_and_file(tmp_path: Path) -> None:
    assert expert_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_placement(8, 1) == [list(range(8))]
    with pytest.raises(InfeasiblePlanError, match=r"n_routed_experts \(6\) is not divisible by ep \(4\)"):
        expert_placement(6, 4)
    file = tmp_path / "placement.json"
    file.write_text(json.dumps({"phy2log": [[0, 1, 5], [2, 3, 5], [4, 5, 0]]}))  # 5 and 0 redundant
    ids = expert_placement(6, 3, file)
    assert ids == [[0, 1, 5], [2, 3, 5], [4, 5, 0]]
    placement = ExpertPlacement(6, tuple(ids[2]))
    assert placement.log2local().tolist() == [2, 3, 3, 3, 0, 1]  # 3 = held elsewhere
    assert compact_ranges([0, 1, 2, 7, 3, 4]) == "0-2,7,3-4"


@pytest.mark.parametrize("content, match", [
    ("not json", "placement file"), ('{"log2phy": []}', "phy2log"), ('{"phy2log": [[0, 1, 2]]}', "1 rank"),
    ('{"phy2log": [[0, 1], [2]]}', "same, non-zero number of slots"),
    ('{"phy2log": [[0, 1], [2, 4]]}', r"rank 1: expert ids must be integers in 0..3"),
    ('{"phy2log": [[0, true], [2, 3]]}', "rank 0: expert ids"), ('{"phy2log": [[0, 0], [2, 3]]}', "twice"),
    ('{"phy2log": [[0, 1], [1, 2]]}', "placed on no rank: 3"),
])
def test_placement_file_invalid(tmp_path: Path, content: str, match: str) -> None:
    file = tmp_path / "placement.json"
    file.write_text(content)
    with pytest.raises(ValueError, match=match):
        expert_placement(4, 2, file)


# ---- sizes ----

@pytest.mark.parametrize("variant", ["v3", "v2_style"])
def test_weight_bytes_match_the_real_model(tiny: ModelConfig, variant: str) -> None:
    config = tiny if variant == "v3" else v2_style(tiny)
    plan = make_plan(config, ParallelDims(), dtype_bytes=2)
    assert plan.total_weight_bytes == model_bytes(config)
    split = make_plan(config, ParallelDims(pp=2), dtype_bytes=2)
    for stage, layers in enumerate(split.stage_ranges):
        model_slice = ModelSlice(layers.start, layers.stop, config.num_hidden_layers)
        assert split.rank_weights[stage].total == model_bytes(config, model_slice)


def test_expert_bytes_divide_over_ranks(tiny: ModelConfig) -> None:
    whole = make_plan(tiny, ParallelDims(), 2).rank_weights[0]
    for ep in (2, 1):
        plan = make_plan(tiny, ParallelDims(tp=2, ep=ep), 2)
        for w in plan.rank_weights:
            assert w.routed_experts * 2 == whole.routed_experts
            assert w.shared_experts * 2 == whole.shared_experts and w.embedding * 2 == whole.embedding
            assert whole.attention / 2 < w.attention < whole.attention  # q_a / kv_a are replicated
    assert [plan.placement(r).local_logical_ids for r in range(2)] == [tuple(range(8))] * 2
    assert make_plan(tiny, ParallelDims(tp=2, ep=2), 2).placement(1) == ExpertPlacement.contiguous(8, 1, 2)


def test_deepseek_v3(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    v3 = ModelConfig.from_hf(tmp_path)
    total = make_plan(v3, ParallelDims(), dtype_bytes=2).total_weight_bytes
    assert abs(total - 2 * 671e9) < 0.02 * 2 * 671e9
    dims = ParallelDims(pp=2, tp=8, ep=8)
    plan = make_plan(v3, dims, dtype_bytes=1, memory_per_rank=80 * 10**9)
    first, last = plan.stage_layers
    assert first + last == 61 and 0 <= first - last <= 3  # the LM head weighs about 1.6 layers
    assert all(len(plan.experts_of(r)) == 32 for r in range(dims.world_size))
    per_rank = [w.total for w in plan.rank_weights]
    assert all(30e9 < b < 50e9 for b in per_rank)  # ~671 GB of FP8 over 16 ranks, plus replicated parts
    assert plan.kv_capacity_tokens is not None and plan.kv_capacity_tokens > 100_000
    with pytest.raises(InfeasiblePlanError, match=r"rank \d+ \(stage \d, tp rank \d\) needs \d+ bytes of weights"
                                                  r".*memory_per_rank = 80000000000 bytes"):
        make_plan(v3, dims, dtype_bytes=2, memory_per_rank=80 * 10**9)


V3_CONFIG_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "deepseek_v3"


def fp8_model_bytes(config: ModelConfig, model_slice: ModelSlice) -> tuple[int, int, int]:
    """(all persistent tensors, the routed experts with their scales, the dequantization buffer) in bytes of
    the FP8-kept model, built on meta."""
    with torch.device("meta"):
        model = DeepseekModel(config, model_slice, dtype=torch.bfloat16, max_positions=16, keep_fp8=True)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    routed = [t for moe in model.moe_layers().values()
              for t in (moe.w13, moe.w2, moe.w13_scale_inv, moe.w2_scale_inv) if t is not None]
    assert model.dequant is not None and model.dequant.tensor is not None
    return (sum(t.numel() * t.element_size() for t in tensors.values()),
            sum(t.numel() * t.element_size() for t in routed), model.dequant.tensor.numel() * 2)


@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 2), (2, 1)])
def test_fp8_weight_bytes_match_the_real_model(tiny: ModelConfig, tp: int, ep: int) -> None:
    config = tiny.replace(quant_block_size=(128, 128))
    dims = ParallelDims(tp=tp, ep=ep)
    plan = make_plan(config, dims, dtype_bytes=2, keep_fp8=True)
    assert plan.fp8_block == (128, 128)
    for rank, w in enumerate(plan.rank_weights):
        model_slice = ModelSlice(0, 5, 5, plan.placement(rank) if ep > 1 else None, ShardInfo(rank, tp),
                                 expert_tp=dims.experts_tensor_parallel)
        total, routed, buffer = fp8_model_bytes(config, model_slice)
        assert (w.routed_experts, w.dequant_buffer) == (routed, buffer)
        if tp == 1:
            assert w.total - w.dequant_buffer == total
        whole = make_plan(config, dims, dtype_bytes=2).rank_weights[rank]  # not kept: 2 bytes per weight
        assert w.routed_experts < 0.51 * whole.routed_experts and w.attention == whole.attention
    assert make_plan(tiny, ParallelDims(), 2, keep_fp8=True).fp8_block is None  # not an FP8 checkpoint


def test_deepseek_v3_fp8_fits_8_x_141gb() -> None:
    v3 = ModelConfig.from_hf(V3_CONFIG_DIR)
    assert v3.quant_block_size == (128, 128) and v3.num_hidden_layers == 61 and v3.rope.factor == 40
    dims = ParallelDims(tp=8, ep=8)
    plan = make_plan(v3, dims, dtype_bytes=2, memory_per_rank=141 * 10**9, keep_fp8=True)
    for w in plan.rank_weights:
        assert 80e9 < w.total < 95e9  # 32 experts x 58 layers of 44M FP8 weights ~ 82 GB, plus the rest
        assert w.routed_experts > 0.85 * w.total and 2e9 < w.dequant_buffer < 3e9
    assert plan.kv_capacity_tokens is not None and plan.kv_capacity_tokens > 500_000
    with pytest.raises(InfeasiblePlanError, match="more than memory_per_rank = 141000000000 bytes"):
        make_plan(v3, dims, dtype_bytes=2, memory_per_rank=141 * 10**9)  # bf16 experts do not fit


def test_kv_capacity(tiny: ModelConfig) -> None:
    plan = make_plan(tiny, ParallelDims(pp=2), 2, kv_cache_bytes_per_rank=1_000_000)
    per_token = [n * tiny.kv_cache_dim * 2 for n in plan.stage_layers]  # the latent, every layer of a stage
    assert plan.kv_tokens_per_rank == [1_000_000 // p for p in per_token]
    assert plan.kv_capacity_tokens == min(plan.kv_tokens_per_rank)
    tp2 = make_plan(tiny, ParallelDims(tp=2), 2, memory_per_rank=10**8)
    weights = tp2.rank_weights[0].total
    assert tp2.kv_tokens_per_rank == [(10**8 - weights) // tp2.cache_bytes_per_token(0)] * 2  # not split by tp
    assert make_plan(tiny, ParallelDims(), 2).kv_capacity_tokens is None
    table = format_plan(plan)
    assert "0-2" in table and "kv capacity per replica" in table


@pytest.mark.parametrize("changes, dims, match", [
    ({}, ParallelDims(tp=3, ep=3), r"num_attention_heads \(4\) is not divisible by tp \(3\)"),
    ({}, ParallelDims(pp=6), r"pp \(6\) is more stages than the model has layers \(5\)"),
    ({"n_routed_experts": 6, "n_group": 2, "topk_group": 1}, ParallelDims(tp=4, ep=4),
     r"n_routed_experts \(6\) is not divisible by ep \(4\)"),
    ({"moe_intermediate_size": 250}, ParallelDims(tp=4, ep=1), r"moe_intermediate_size \(250\)"),
    ({"moe_intermediate_size": 250}, ParallelDims(tp=4, ep=4), r"n_shared_experts \* moe_intermediate_size \(250\) is not divisible by tp \(4\)"),
    ({"intermediate_size": 1030}, ParallelDims(tp=4, ep=4), r"intermediate_size \(1030\) is not divisible"),
])
def test_infeasible_reasons(tiny: ModelConfig, changes: dict, dims: ParallelDims, match: str) -> None:
    with pytest.raises(InfeasiblePlanError, match=match):
        make_plan(tiny.replace(**changes), dims, 2)


def test_uneven_experts_with_placement_file_and_pp_layers(tiny: ModelConfig, tmp_path: Path) -> None:
    file = tmp_path / "placement.json"
    file.write_text(json.dumps({"phy2log": [[0, 1], [2, 3], [4, 5], [5, 0]]}))
    config = tiny.replace(n_routed_experts=6, n_group=2, topk_group=1)
    plan = make_plan(config, ParallelDims(tp=4, ep=4), 2, pp_layers=[5], placement_file=file)
    assert plan.experts_of(3) == (5, 0)
    assert make_plan(tiny.replace(intermediate_size=1030, first_k_dense_replace=0), ParallelDims(tp=4), 2)
    with pytest.raises(InfeasiblePlanError, match=r"needs \d+ bytes of weights \(at least \d+ bytes of cache for 64 tokens\)"):
        make_plan(tiny, ParallelDims(), 2, memory_per_rank=make_plan(tiny, ParallelDims(), 2).total_weight_bytes)
    assert [plan.stage_of_layer(i) for i in (0, 4)] == [0, 0]
    with pytest.raises(ValueError, match="entries"):
        ParallelPlan(tiny, ParallelDims(), 2, (5,), (tuple(range(8)),), plan.rank_weights)
