"""Test oracle: tiny random DeepSeek checkpoints written with Hugging Face transformers.

Everything here is test-only. Checkpoints are produced by transformers' own
``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` so that moeserve's loader and model
code can be checked against the reference implementation on the exact same weights
(``oracle_reference.py`` runs it; ``oracle_tokenizer.py`` trains the tokenizer they ship with).

Public API:
    VARIANTS: dict[str, dict]                      named config overrides
    write_checkpoint(out_dir, variant, seed=0, dtype=torch.float32, shards=1) -> Path
    MTP_FILE                                       the file of a checkpoint's MTP module
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from oracle_tokenizer import VOCAB_SIZE, train_tokenizer

_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# Sizes shared by every variant; VARIANTS entries override/extend these.
_BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "max_position_embeddings": 512,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
    "rope_parameters": _DEFAULT_ROPE,
}

# "arch" selects V2 or V3; every other key is a config kwarg. V2 never normalises top-k
# weights in HF, so V2 variants keep norm_topk_prob=False. HF V3 is always sigmoid + noaux_tc.
VARIANTS: dict[str, dict[str, Any]] = {
    "v2_qproj_greedy": {
        "arch": "v2", "num_hidden_layers": 2, "q_lora_rank": None, "kv_lora_rank": 16,
        "topk_method": "greedy", "scoring_func": "softmax", "num_experts_per_tok": 2,
        "n_shared_experts": 1, "first_k_dense_replace": 0, "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
    },
    "v2_qlora_group_yarn": {
        "arch": "v2", "num_hidden_layers": 3, "q_lora_rank": 32, "kv_lora_rank": 32,
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "scoring_func": "softmax", "num_experts_per_tok": 3, "n_shared_experts": 2,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.0, "norm_topk_prob": False,
        "rope_parameters": _YARN,
    },
    "v3_noaux_norm": {
        "arch": "v3", "num_hidden_layers": 3, "q_lora_rank": 32, "kv_lora_rank": 16,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    },
    "v3_noaux_nonorm_yarn_shared2": {
        "arch": "v3", "num_hidden_layers": 2, "q_lora_rank": None, "kv_lora_rank": 32,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 3, "n_shared_experts": 2, "first_k_dense_replace": 0,
        "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rope_parameters": _YARN,
    },
    "v3_r1_vocab": {  # room for DeepSeek-R1's added tokens on top of the trained vocabulary (r1_checkpoint.py)
        "arch": "v3", "num_hidden_layers": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "vocab_size": 352,
    },
    "v3_noshared": {
        "arch": "v3", "num_hidden_layers": 4, "q_lora_rank": 16, "kv_lora_rank": 16,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1,
        "num_experts_per_tok": 2, "n_shared_experts": 0, "first_k_dense_replace": 2,
        "routed_scaling_factor": 1.5, "norm_topk_prob": True,
    },
}

_BIAS_SCALE = 0.3
# lm_head is re-drawn with a larger std so logits spread out (std ~4.7) and greedy top-1/top-2
# gaps stay far above float32 noise.
_LM_HEAD_STD = 0.6


def model_classes(arch: str) -> tuple[type, type]:
    """Return (config class, causal-LM class) for ``arch`` in {"v2", "v3"}."""
    import transformers

    if arch == "v2":
        return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    if arch == "v3":
        return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    raise ValueError(f"unknown arch {arch!r}")


def build_model(variant: str, seed: int = 0) -> torch.nn.Module:
    """Build the float32 HF model for ``variant`` with seeded random weights.

    ``lm_head`` is re-drawn with std ``_LM_HEAD_STD``; V3 routers get a non-zero
    ``e_score_correction_bias`` (normal, std ``_BIAS_SCALE``). Same (variant, seed) -> same weights.
    """
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    overrides = copy.deepcopy(VARIANTS[variant])
    arch = overrides.pop("arch")
    kwargs = {**copy.deepcopy(_BASE), **overrides}
    if arch == "v3":
        kwargs["num_mtp_layers"] = 0  # HF has no MTP weights; don't advertise any
    config_cls, model_cls = model_classes(arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, _LM_HEAD_STD)
    if arch == "v3":
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None:
                    bias = torch.randn(gate.e_score_correction_bias.shape, generator=gen) * _BIAS_SCALE
                    gate.e_score_correction_bias.copy_(bias)
    return model


def _shard_bytes(model: torch.nn.Module, shards: int) -> int:
    """Max shard size in bytes that splits ``model``'s state dict into about ``shards`` files."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return max(1, total // shards)


def write_checkpoint(
    out_dir: Path, variant: str, seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 1,
    mtp: bool = False,
) -> Path:
    """Write a tiny HF DeepSeek checkpoint for ``variant`` into ``out_dir`` and return it.

    Contents: ``config.json``, safetensors weights (``shards > 1`` forces an index file and at
    least two shard files), ``generation_config.json`` (bos 0, eos 1) and the tokenizer from
    :func:`train_tokenizer`. Weights are cast to ``dtype`` except V3's
    ``e_score_correction_bias``, which stays float32 as in real DeepSeek-V3 checkpoints.
    Routed experts are stored per expert (``mlp.experts.{j}.{gate,up,down}_proj.weight``).
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    model = build_model(variant, seed)
    model.to(dtype)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, do_sample=False)
    max_shard = _shard_bytes(model, shards) if shards > 1 else "10GB"
    model.save_pretrained(out_dir, max_shard_size=max_shard)
    if shards > 1:
        assert (out_dir / "model.safetensors.index.json").exists(), "sharding did not happen"
    if mtp:
        _add_mtp(out_dir, variant, seed, dtype)
    train_tokenizer(out_dir)
    return out_dir


MTP_FILE = "model-mtp.safetensors"


def _add_mtp(out_dir: Path, variant: str, seed: int, dtype: torch.dtype) -> None:
    """Add a random MTP module as DeepSeek-V3 ships it: the tensors of layer ``num_hidden_layers`` (a decoder
    block -- drawn by transformers as the extra layer of a deeper model --, ``enorm``, ``hnorm``, ``eh_proj``,
    ``shared_head.norm``, and copies of the embedding and head under ``embed_tokens`` / ``shared_head.head``),
    in a file of their own listed in the index; config.json gets ``num_nextn_predict_layers: 1``."""
    import tempfile

    from safetensors.torch import load_file, save_file

    config = json.loads((out_dir / "config.json").read_text())
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    deeper = copy.deepcopy(VARIANTS[variant])
    deeper["num_hidden_layers"] = n + 1
    name = f"_mtp_{variant}"
    VARIANTS[name] = deeper
    try:
        extra = build_model(name, seed + 1000).to(dtype)
    finally:
        del VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        extra.save_pretrained(tmp)
        block = {k: v for k, v in load_file(str(Path(tmp) / "model.safetensors")).items()
                 if k.startswith(f"model.layers.{n}.")}
    main = _read_all(out_dir)
    gen = torch.Generator().manual_seed(seed + 2000)
    prefix = f"model.layers.{n}"

    def near_one() -> torch.Tensor:
        return (1.0 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)

    block.update({
        f"{prefix}.enorm.weight": near_one(), f"{prefix}.hnorm.weight": near_one(),
        f"{prefix}.eh_proj.weight": (torch.randn(hidden, 2 * hidden, generator=gen) / (2 * hidden) ** 0.5).to(dtype),
        f"{prefix}.shared_head.norm.weight": near_one(),
        f"{prefix}.embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
        f"{prefix}.shared_head.head.weight": main["lm_head.weight"].clone(),
    })
    save_file({k: v.contiguous() for k, v in block.items()}, str(out_dir / MTP_FILE), metadata={"format": "pt"})
    index_file = out_dir / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
    else:
        index = {"metadata": {}, "weight_map": dict.fromkeys(main, "model.safetensors")}
    index["weight_map"].update(dict.fromkeys(block, MTP_FILE))
    index_file.write_text(json.dumps(index, indent=2))
    config["num_nextn_predict_layers"] = 1
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def _read_all(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(ckpt_dir).glob("model*.safetensors")):
        if file.name != MTP_FILE:
            out.update(load_file(str(file)))
    return out
