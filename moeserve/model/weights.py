"""Which checkpoint tensors fill which parts of a (sliced) model.

``weight_specs(model)`` lists, for the layers and experts this rank holds, each checkpoint tensor name with
its expected shape and the destination view. Names follow DeepSeek's Hugging Face layout; the fused expert
layout that newer transformers versions keep in memory (``mlp.experts.gate_up_proj``) is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.experts.moe import MoE
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.layers import MLP


@dataclass(frozen=True)
class WeightSpec:
    name: str  # checkpoint tensor name
    shape: tuple[int, ...]  # expected shape in the checkpoint
    target: torch.Tensor  # view of the parameter to copy into
    # (fused name, index along dim 0, row range) to read instead when the plain name is absent
    alternatives: tuple[tuple[str, int, int, int], ...] = ()


def _spec(name: str, target: torch.Tensor,
          alternatives: tuple[tuple[str, int, int, int], ...] = ()) -> WeightSpec:
    return WeightSpec(name, tuple(target.shape), target, alternatives)


def _mlp_specs(prefix: str, mlp: MLP) -> list[WeightSpec]:
    inter = mlp.intermediate_size
    return [
        _spec(f"{prefix}.gate_proj.weight", mlp.gate_up_proj.data[:inter]),
        _spec(f"{prefix}.up_proj.weight", mlp.gate_up_proj.data[inter:]),
        _spec(f"{prefix}.down_proj.weight", mlp.down_proj.data),
    ]


def _moe_specs(prefix: str, moe: MoE) -> list[WeightSpec]:
    specs = [_spec(f"{prefix}.gate.weight", moe.gate_weight.data)]
    if moe.e_score_correction_bias is not None:
        specs.append(_spec(f"{prefix}.gate.e_score_correction_bias", moe.e_score_correction_bias))
    inter = moe.w2.shape[-1]
    for slot, expert_id in enumerate(moe.placement.local_logical_ids):
        ep = f"{prefix}.experts.{expert_id}"
        fused = f"{prefix}.experts.gate_up_proj"
        specs += [
            _spec(f"{ep}.gate_proj.weight", moe.w13.data[slot, :inter], ((fused, expert_id, 0, inter),)),
            _spec(f"{ep}.up_proj.weight", moe.w13.data[slot, inter:], ((fused, expert_id, inter, 2 * inter),)),
            _spec(f"{ep}.down_proj.weight", moe.w2.data[slot],
                  ((f"{prefix}.experts.down_proj", expert_id, 0, moe.w2.shape[1]),)),
        ]
    if moe.shared_experts is not None:
        specs += _mlp_specs(f"{prefix}.shared_experts", moe.shared_experts)
    return specs


def _attn_specs(prefix: str, attn: torch.nn.Module) -> list[WeightSpec]:
    specs = []
    for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        param = getattr(attn, name, None)
        if param is not None:
            specs.append(_spec(f"{prefix}.{name}.weight", param.data))
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        norm = getattr(attn, name, None)
        if norm is not None:
            specs.append(_spec(f"{prefix}.{name}.weight", norm.weight.data))
    return specs


def weight_specs(model: DeepseekModel) -> list[WeightSpec]:
    specs: list[WeightSpec] = []
    if model.embed_tokens is not None:
        specs.append(_spec("model.embed_tokens.weight", model.embed_tokens.data))
    for key, layer in model.decoder_layers().items():
        prefix = f"model.layers.{key}"
        specs.append(_spec(f"{prefix}.input_layernorm.weight", layer.input_layernorm.weight.data))
        specs.append(_spec(f"{prefix}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight.data))
        specs += _attn_specs(f"{prefix}.self_attn", layer.self_attn)
        if isinstance(layer.mlp, MoE):
            specs += _moe_specs(f"{prefix}.mlp", layer.mlp)
        else:
            specs += _mlp_specs(f"{prefix}.mlp", layer.mlp)
    if model.slice.has_head:
        specs.append(_spec("model.norm.weight", model.norm.weight.data))
        if model.lm_head is not model.embed_tokens:
            name = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
            specs.append(_spec(name, model.lm_head.data))
    return specs
