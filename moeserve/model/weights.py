"""Which checkpoint tensors fill which parts of a (sliced, sharded) model.

``weight_specs(model)`` lists, for the layers and experts this rank holds, each checkpoint tensor name with
its expected full shape, the destination view, and -- for tensor-parallel weights -- which slice of the
full tensor this rank keeps. A weight kept in float8 also names the view its ``weight_scale_inv`` goes to
(narrowed like the weight: kept shards start on block boundaries). Names follow DeepSeek's Hugging Face layout; the fused expert layout that newer
transformers versions keep in memory (``mlp.experts.gate_up_proj``) is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.experts.moe import MoE
from moeserve.model.deepseek import DecoderLayer, DeepseekModel
from moeserve.model.layers import MLP
from moeserve.model.mla import MLA


@dataclass(frozen=True)
class Narrow:
    """This rank keeps part ``rank`` of ``size`` equal parts of the full tensor along ``dim``."""

    dim: int
    rank: int
    size: int


@dataclass(frozen=True)
class WeightSpec:
    name: str  # checkpoint tensor name
    shape: tuple[int, ...]  # expected shape in the checkpoint (the full tensor)
    target: torch.Tensor  # view of the parameter to copy into
    # (fused name, index along dim 0, row range) to read instead when the plain name is absent
    alternatives: tuple[tuple[str, int, int, int], ...] = ()
    narrow: Narrow | None = None
    scale_target: torch.Tensor | None = None  # where the block scales go when ``target`` is float8

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """The full ``weight_scale_inv`` shape in the checkpoint (only for float8 targets)."""
        assert self.scale_target is not None, f"{self.name} is not kept in float8"
        return _full_shape(self.scale_target, self.narrow)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the (already shape-checked) full tensor."""
        if self.narrow is None:
            return full
        n = self.narrow
        length = full.shape[n.dim] // n.size
        return full.narrow(n.dim, n.rank * length, length)


def _full_shape(local: torch.Tensor, narrow: Narrow | None) -> tuple[int, ...]:
    shape = list(local.shape)
    if narrow is not None:
        shape[narrow.dim] *= narrow.size
    return tuple(shape)


def _spec(name: str, target: torch.Tensor, alternatives: tuple[tuple[str, int, int, int], ...] = (),
          narrow: Narrow | None = None, scale_target: torch.Tensor | None = None) -> WeightSpec:
    return WeightSpec(name, _full_shape(target, narrow), target, alternatives, narrow, scale_target)


def _mlp_specs(prefix: str, mlp: MLP) -> list[WeightSpec]:
    inter, tp = mlp.intermediate_size, mlp.shard
    rows = Narrow(0, tp.rank, tp.size) if tp.size > 1 else None
    cols = Narrow(1, tp.rank, tp.size) if tp.size > 1 else None
    return [
        _spec(f"{prefix}.gate_proj.weight", mlp.gate_up_proj.data[:inter], narrow=rows),
        _spec(f"{prefix}.up_proj.weight", mlp.gate_up_proj.data[inter:], narrow=rows),
        _spec(f"{prefix}.down_proj.weight", mlp.down_proj.data, narrow=cols),
    ]


def _expert_specs(prefix: str, moe: MoE, slot: int, expert_id: int) -> list[WeightSpec]:
    inter = moe.w2.shape[-1]  # local intermediate size
    full_inter = inter * (moe.shard.size if moe.expert_tp else 1)
    split = moe.expert_tp and moe.shard.size > 1
    rows = Narrow(0, moe.shard.rank, moe.shard.size) if split else None
    cols = Narrow(1, moe.shard.rank, moe.shard.size) if split else None
    ep, fused = f"{prefix}.experts.{expert_id}", f"{prefix}.experts.gate_up_proj"
    s13, s2 = moe.w13_scale_inv, moe.w2_scale_inv  # None unless the experts are kept float8
    return [
        _spec(f"{ep}.gate_proj.weight", moe.w13.data[slot, :inter], ((fused, expert_id, 0, full_inter),), rows,
              None if s13 is None else s13.data[slot, 0]),
        _spec(f"{ep}.up_proj.weight", moe.w13.data[slot, inter:],
              ((fused, expert_id, full_inter, 2 * full_inter),), rows, None if s13 is None else s13.data[slot, 1]),
        _spec(f"{ep}.down_proj.weight", moe.w2.data[slot],
              ((f"{prefix}.experts.down_proj", expert_id, 0, moe.w2.shape[1]),), cols,
              None if s2 is None else s2.data[slot]),
    ]


def _moe_specs(prefix: str, moe: MoE) -> list[WeightSpec]:
    specs = [_spec(f"{prefix}.gate.weight", moe.gate_weight.data)]
    if moe.e_score_correction_bias is not None:
        specs.append(_spec(f"{prefix}.gate.e_score_correction_bias", moe.e_score_correction_bias))
    for slot, expert_id in enumerate(moe.placement.local_logical_ids):
        specs += _expert_specs(prefix, moe, slot, expert_id)
    if moe.shared_experts is not None:
        specs += _mlp_specs(f"{prefix}.shared_experts", moe.shared_experts)
    return specs


def _attn_specs(prefix: str, attn: MLA) -> list[WeightSpec]:
    tp = attn.shard
    heads = Narrow(0, tp.rank, tp.size) if tp.size > 1 else None  # rows grouped by head
    specs = []
    for name, narrow in (("q_proj", heads), ("q_a_proj", None), ("q_b_proj", heads),
                         ("kv_a_proj_with_mqa", None), ("kv_b_proj", heads),
                         ("o_proj", Narrow(1, tp.rank, tp.size) if tp.size > 1 else None)):
        param = getattr(attn, name, None)
        if param is not None:
            specs.append(_spec(f"{prefix}.{name}.weight", param.data, narrow=narrow))
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        norm = getattr(attn, name, None)
        if norm is not None:
            specs.append(_spec(f"{prefix}.{name}.weight", norm.weight.data))
    return specs


def _layer_specs(prefix: str, layer: DecoderLayer) -> list[WeightSpec]:
    specs = [_spec(f"{prefix}.input_layernorm.weight", layer.input_layernorm.weight.data),
             _spec(f"{prefix}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight.data)]
    specs += _attn_specs(f"{prefix}.self_attn", layer.self_attn)
    if isinstance(layer.mlp, MoE):
        specs += _moe_specs(f"{prefix}.mlp", layer.mlp)
    else:
        specs += _mlp_specs(f"{prefix}.mlp", layer.mlp)
    return specs


def _mtp_specs(model: DeepseekModel, vocab_rows: Narrow | None) -> list[WeightSpec]:
    """The MTP module's own tensors (layer ``num_hidden_layers``); its embedding and head are the main
    model's (``model.embed_tokens``, ``lm_head``), read once more only by a last stage without the embedding."""
    mtp = model.mtp
    assert mtp is not None
    prefix = f"model.layers.{mtp.layer_id}"
    specs = [_spec(f"{prefix}.enorm.weight", mtp.enorm.weight.data),
             _spec(f"{prefix}.hnorm.weight", mtp.hnorm.weight.data),
             _spec(f"{prefix}.eh_proj.weight", mtp.eh_proj.data),
             _spec(f"{prefix}.shared_head.norm.weight", mtp.shared_head_norm.weight.data)]
    assert isinstance(mtp.block, DecoderLayer)
    specs += _layer_specs(prefix, mtp.block)
    if model.mtp_embed is not None:
        specs.append(_spec("model.embed_tokens.weight", model.mtp_embed.data, narrow=vocab_rows))
    return specs


def weight_specs(model: DeepseekModel) -> list[WeightSpec]:
    specs: list[WeightSpec] = []
    tp = model.slice.tp
    vocab_rows = Narrow(0, tp.rank, tp.size) if tp.size > 1 else None
    if model.embed_tokens is not None:
        specs.append(_spec("model.embed_tokens.weight", model.embed_tokens.data, narrow=vocab_rows))
    for key, layer in model.decoder_layers().items():
        specs += _layer_specs(f"model.layers.{key}", layer)
    if model.mtp is not None:
        specs += _mtp_specs(model, vocab_rows)
    if model.slice.has_head:
        specs.append(_spec("model.norm.weight", model.norm.weight.data))
        if model.lm_head is not model.embed_tokens:
            name = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
            specs.append(_spec(name, model.lm_head.data, narrow=vocab_rows))
    return specs
