"""ModelConfig.from_hf: every math-changing field, both rope spellings, clear errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeserve.model.config import ConfigError, ModelConfig

V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                            "activation_scheme": "dynamic"},
}


def write(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_deepseek_v3_fields(tmp_path: Path) -> None:
    c = ModelConfig.from_hf(write(tmp_path, V3))
    assert (c.q_lora_rank, c.kv_lora_rank, c.kv_cache_dim, c.qk_head_dim) == (1536, 512, 576, 192)
    assert (c.scoring_func, c.topk_method, c.n_group, c.topk_group, c.norm_topk_prob) == (
        "sigmoid", "noaux_tc", 8, 4, True)
    assert c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope.original_max_position_embeddings == 4096
    assert c.quant_block_size == (128, 128)
    assert c.eos_token_ids == (1,)
    assert not c.is_moe_layer(2) and c.is_moe_layer(3)
    # YaRN's mscale enters the softmax scale squared: 192^-0.5 * (0.1 ln 40 + 1)^2
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)


def test_rope_parameters_spelling_equals_rope_scaling(tmp_path: Path) -> None:
    newer = dict(V3)
    del newer["rope_scaling"], newer["rope_theta"]
    newer["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 1.0}
    a = ModelConfig.from_hf(write(tmp_path, V3)).rope
    (tmp_path / "b").mkdir()
    b = ModelConfig.from_hf(write(tmp_path / "b", newer)).rope
    assert a == b


def test_deepseek_v2_defaults(tmp_path: Path) -> None:
    raw = {k: v for k, v in V3.items() if k not in ("scoring_func", "topk_method", "norm_topk_prob",
                                                    "quantization_config")}
    raw.update(model_type="deepseek_v2", q_lora_rank=None, n_group=None, topk_group=None)
    c = ModelConfig.from_hf(write(tmp_path, raw))
    assert c.q_lora_rank is None
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.n_group) == ("softmax", "greedy", False, 1)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"scoring_func": "relu"}, "scoring_func 'relu' is not supported"),
    ({"topk_method": "random"}, "topk_method 'random' is not supported"),
    ({"kv_lora_rank": "512"}, "field 'kv_lora_rank' must be int"),
    ({"n_group": 7}, "n_routed_experts \\(256\\) must be divisible by n_group \\(7\\)"),
    ({"topk_group": 9}, "topk_group must be in 1..n_group"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok must be in"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope type 'dynamic' is not supported"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config 'awq'"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim must be even"),
])
def test_unsupported_values_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(write(tmp_path, {**V3, **change}))


def test_missing_field_and_not_a_checkpoint(tmp_path: Path) -> None:
    raw = dict(V3)
    del raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="required field 'kv_lora_rank' is missing"):
        ModelConfig.from_hf(write(tmp_path, raw))
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "empty")


def test_frozen() -> None:
    c = ModelConfig.from_dict(V3)
    with pytest.raises(AttributeError):
        c.hidden_size = 1  # type: ignore[misc]
