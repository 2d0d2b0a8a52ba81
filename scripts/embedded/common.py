"""Constants, the checkpoint's shape and config.json, and small helpers shared by the phases."""

from __future__ import annotations

import platform

import torch

BOS, EOS = "<|bos|>", "<|eos|>"
EXCLUDED_DIRS = ("test", "tests", "idlelib", "site-packages", "__pycache__")
# validation files: every 30th (from the 15th) of the sorted files that look like ordinary code: not under
# encodings/ (codec tables) or pydoc_data/ (one large English text), 2-100 kB. They are left out of training.
VAL_EVERY, VAL_OFFSET = 30, 15
VAL_SKIP_DIRS = ("encodings", "pydoc_data")
VAL_SIZE_RANGE = (2_000, 100_000)
CACHE_FORMAT = "moeserve-embedded-v1"
SIZE_LIMIT_BYTES = 25 * 1000 * 1000
SAMPLE_PROMPT = "def fib(n):"

# The checkpoint's shape: ~10.9M parameters, ~21.8 MB in bfloat16 (see docs/embedded_model.md).
SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,  # the dense layer(s)
    moe_intermediate_size=256,  # each routed expert and the shared expert
    num_hidden_layers=5,
    first_k_dense_replace=1,  # layer 0 dense, layers 1..4 MoE
    num_attention_heads=4,
    q_lora_rank=128,
    kv_lora_rank=96,
    qk_rope_head_dim=32,
    qk_nope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,  # noaux_tc: groups ranked by the sum of their top-2 biased scores, best 2 groups kept
    topk_group=2,
    routed_scaling_factor=1.0,
    max_position_embeddings=512,
)


def log(msg: str) -> None:
    print(msg, flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def hf_config(shape: dict) -> dict:
    """The checkpoint's config.json, with DeepSeek-V3's field names."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": shape["vocab_size"],
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "moe_intermediate_size": shape["moe_intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_attention_heads"],
        "n_shared_experts": shape["n_shared_experts"],
        "n_routed_experts": shape["n_routed_experts"],
        "num_experts_per_tok": shape["num_experts_per_tok"],
        "n_group": shape["n_group"],
        "topk_group": shape["topk_group"],
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": shape["routed_scaling_factor"],
        "first_k_dense_replace": shape["first_k_dense_replace"],
        "moe_layer_freq": 1,
        "kv_lora_rank": shape["kv_lora_rank"],
        "q_lora_rank": shape["q_lora_rank"],
        "qk_rope_head_dim": shape["qk_rope_head_dim"],
        "qk_nope_head_dim": shape["qk_nope_head_dim"],
        "v_head_dim": shape["v_head_dim"],
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": shape["max_position_embeddings"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_interleave": True,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }
