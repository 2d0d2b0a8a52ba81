"""Random-weight models and checkpoints (for benchmarks and tests; nothing is downloaded).

``write_random_checkpoint`` builds a model from a config dict, fills it with seeded random weights and
saves it in DeepSeek's Hugging Face layout (optionally sharded, optionally FP8 with 128x128 block scales).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.fp8 import FP8_DTYPE, FP8_MAX, is_fp8_weight
from moeserve.model.weights import weight_specs


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small DeepSeek-V2-shaped config.json whose MLA dims the fused kernels take whole (kv_lora_rank 64,
    rope 16): for tests and benchmarks that want the model cheap."""
    return {
        "model_type": "deepseek_v2", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 192,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "kv_lora_rank": 64, "q_lora_rank": None, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32, "v_head_dim": 32, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "initializer_range": 0.2,
    } | overrides


@torch.no_grad()
def init_random_(model: DeepseekModel, seed: int = 0, std: float = 0.02) -> DeepseekModel:
    """Fill every parameter: norms with ones, correction biases small, matrices normal(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
    return model


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn weight, float32 weight_scale_inv [ceil(out/bo), ceil(in/bi)])."""
    out_dim, in_dim = weight.shape
    bo, bi = block
    pad = torch.zeros(-(-out_dim // bo) * bo, -(-in_dim // bi) * bi, dtype=torch.float32)
    pad[:out_dim, :in_dim] = weight.float()
    blocks = pad.view(pad.shape[0] // bo, bo, pad.shape[1] // bi, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [nbo, nbi]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).view_as(pad)[:out_dim, :in_dim]
    return q.to(FP8_DTYPE), scale_inv


def model_state(model: DeepseekModel, fp8: bool = False, dtype: torch.dtype | None = None
                ) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names (contiguous copies)."""
    state: dict[str, torch.Tensor] = {}
    for spec in weight_specs(model):
        if spec.narrow is not None:
            raise ValueError("model_state needs an unsharded model (tensor parallel size 1)")
        tensor = spec.target.detach().contiguous().clone()
        if fp8 and is_fp8_weight(spec.name, tuple(tensor.shape)):
            state[spec.name], state[spec.name + "_scale_inv"] = quantize_fp8(tensor)
        else:
            keep_fp32 = "mlp.gate." in spec.name
            state[spec.name] = tensor if (dtype is None or keep_fp32) else tensor.to(dtype)
    return state


def save_checkpoint(state: dict[str, torch.Tensor], raw_config: dict[str, Any], path: str | Path,
                    max_shard_bytes: int | None = None) -> Path:
    """Write config.json and the tensors (one file, or shards with model.safetensors.index.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw_config, indent=2))
    if max_shard_bytes is None:
        save_file(state, str(path / "model.safetensors"))
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file))
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def write_random_checkpoint(raw_config: dict[str, Any], path: str | Path, seed: int = 0, std: float = 0.02,
                            fp8: bool = False, dtype: torch.dtype | None = None,
                            max_shard_bytes: int | None = None) -> Path:
    config = ModelConfig.from_dict(raw_config)
    model = init_random_(DeepseekModel(config, dtype=torch.float32, max_positions=16), seed, std)
    raw = dict(raw_config)
    if fp8:
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                      "activation_scheme": "dynamic"}
    state = model_state(model, fp8=fp8, dtype=dtype)
    del model
    return save_checkpoint(state, raw, path, max_shard_bytes)
