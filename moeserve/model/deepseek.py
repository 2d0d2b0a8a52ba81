"""The DeepSeek-V2/V3 decoder on local shapes.

A ``DeepseekModel`` holds a contiguous range of layers (a pipeline stage); the first stage also holds the
embedding and the last the final norm and LM head. Which range, and which experts, is decided outside
(``ModelSlice``); the math here never asks for a rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.comm.shard import SINGLE, ShardInfo
from moeserve.experts.ep_dispatch import check_dispatch
from moeserve.experts.moe import ExpertPlacement, MoE
from moeserve.model.attn_metadata import AttnMetadata
from moeserve.model.config import ModelConfig
from moeserve.model.cpu_linear import PackedLinear
from moeserve.model.fp8 import DequantBuffer, routed_fp8_block
from moeserve.model.layers import MLP, RMSNorm, RotaryEmbedding
from moeserve.model.mla import MLA
from moeserve.model.mtp import MTPLayer


@dataclass(frozen=True)
class ModelSlice:
    """What one rank builds: layers [layer_start, layer_end), its tensor-parallel shard, and which routed
    experts (``placement``; or, with ``expert_tp``, a tp slice of every expert). ``ep_dispatch``: how routed
    tokens reach their experts, "allreduce" or "alltoall" (see ``experts/ep_dispatch.py``)."""

    layer_start: int
    layer_end: int
    num_layers_total: int
    placement: ExpertPlacement | None = field(default=None)
    tp: ShardInfo = SINGLE
    expert_tp: bool = False
    ep_dispatch: str = "allreduce"

    def __post_init__(self) -> None:
        check_dispatch(self.ep_dispatch, self.expert_tp)

    @classmethod
    def full(cls, config: ModelConfig) -> ModelSlice:
        return cls(0, config.num_hidden_layers, config.num_hidden_layers)

    @property
    def has_embedding(self) -> bool:
        return self.layer_start == 0

    @property
    def has_head(self) -> bool:
        return self.layer_end == self.num_layers_total

    @property
    def layer_ids(self) -> range:
        return range(self.layer_start, self.layer_end)


class DecoderLayer(nn.Module):
    self_attn: MLA
    mlp: MLP | MoE

    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, model_slice: ModelSlice,
                 dtype: torch.dtype | None, fp8_block: tuple[int, int] | None = None,
                 dequant: DequantBuffer | None = None):
        super().__init__()
        self.layer_id = layer_id
        tp = model_slice.tp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = MLA(config, rotary, dtype=dtype, shard=tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = (MoE(config, model_slice.placement, dtype, tp, model_slice.expert_tp, model_slice.ep_dispatch,
                        fp8_block=fp8_block, dequant=dequant)
                    if config.is_moe_layer(layer_id)
                    else MLP(config.hidden_size, config.intermediate_size, dtype, tp))

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, meta: AttnMetadata,
                kv_cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (this layer's MLP output, the residual stream before it): the residual adds are
        left to the next norm, which fuses them (``RMSNorm.add_norm``); the hidden state is their sum."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm.add_norm(h, residual)
        attn = self.self_attn(x, meta, kv_cache)
        if isinstance(self.mlp, MoE) and (normed := self.mlp.norm_and_logits(attn, residual,
                                                                             self.post_attention_layernorm)):
            x, residual, logits = normed  # a one-token step: the norm in the router's launch
            return self.mlp(x, logits), residual
        x, residual = self.post_attention_layernorm.add_norm(attn, residual)
        return self.mlp(x), residual


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, model_slice: ModelSlice | None = None,
                 dtype: torch.dtype = torch.float32, max_positions: int | None = None, keep_fp8: bool = False,
                 with_mtp: bool = False):
        """``keep_fp8``: with a block-scaled FP8 config, hold the routed experts in float8 (see ``fp8.py``).
        ``with_mtp``: the slice with the LM head also builds the multi-token-prediction module (``mtp.py``)."""
        super().__init__()
        self.config = config
        self.slice = model_slice or ModelSlice.full(config)
        self.dtype = dtype
        rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim,
                                 max_positions or config.max_position_embeddings)
        # embedding and LM head are split by vocabulary over the tp ranks: rows [vocab_start, + local_vocab)
        tp = self.slice.tp
        self.local_vocab = tp.split(config.vocab_size, "vocab_size")
        self.vocab_start = tp.rank * self.local_vocab
        self.embed_tokens = (nn.Parameter(torch.empty(self.local_vocab, config.hidden_size, dtype=dtype))
                             if self.slice.has_embedding else None)
        fp8_block = routed_fp8_block(config, keep_fp8, self.slice.tp.size, self.slice.expert_tp)
        self.dequant = DequantBuffer() if fp8_block else None
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(config, i, rotary, self.slice, dtype, fp8_block, self.dequant)
            for i in self.slice.layer_ids})
        self.mtp: MTPLayer | None = None
        self.mtp_embed: nn.Parameter | None = None  # the embedding's copy on a last stage without one
        if with_mtp and self.slice.has_head:
            self._build_mtp(rotary, fp8_block)
        self._reserve_dequant()
        if self.slice.has_head:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = (self.embed_tokens if config.tie_word_embeddings and self.embed_tokens is not None
                            else nn.Parameter(torch.empty(self.local_vocab, config.hidden_size, dtype=dtype)))
        self.rotary = rotary
        self.linear = PackedLinear()

    def _build_mtp(self, rotary: RotaryEmbedding, fp8_block: tuple[int, int] | None) -> None:
        config = self.config
        if config.num_nextn_predict_layers < 1:
            raise ValueError("this model has no multi-token-prediction module (config.json's "
                             "num_nextn_predict_layers is 0)")
        block = DecoderLayer(config, config.mtp_layer_id, rotary, self.slice, self.dtype, fp8_block, self.dequant)
        self.mtp = MTPLayer(config, block, self.dtype)
        if self.embed_tokens is None:
            self.mtp_embed = nn.Parameter(torch.empty(self.local_vocab, config.hidden_size, dtype=self.dtype))

    def _reserve_dequant(self) -> None:
        """Allocate the FP8 experts' shared dequantization buffer now, before the cache is sized."""
        mtp_moe = [self.mtp.block.mlp] if self.mtp is not None and isinstance(self.mtp.block.mlp, MoE) else []
        numel = max((moe.dequant_numel for moe in [*self.moe_layers().values(), *mtp_moe]), default=0)
        if self.dequant is not None and numel:
            self.dequant.reserve(numel, self.dtype)

    def decoder_layers(self) -> dict[int, DecoderLayer]:
        return {int(i): layer for i, layer in self.layers.items()}  # type: ignore[misc]

    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.mlp for i, layer in self.decoder_layers().items() if isinstance(layer.mlp, MoE)}

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None, "this stage holds no embedding"
        return self._embed_with(self.embed_tokens, token_ids)

    def _embed_with(self, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        if self.slice.tp.size == 1:
            return F.embedding(token_ids, weight)
        local = token_ids - self.vocab_start
        held = (local >= 0) & (local < self.local_vocab)
        h = F.embedding(torch.where(held, local, 0), weight) * held.unsqueeze(-1).to(self.dtype)
        return self.slice.tp.all_reduce(h)  # one rank holds each row, the others add exact zeros

    def mtp_forward(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, meta: AttnMetadata,
                    kv_cache: torch.Tensor | None) -> torch.Tensor:
        """The MTP module on [T] tokens t+1 and [T, hidden] normed hidden states at t -> [T, hidden]."""
        assert self.mtp is not None, "this slice holds no MTP module"
        weight = self.embed_tokens if self.embed_tokens is not None else self.mtp_embed
        assert weight is not None
        return self.mtp(self._embed_with(weight, next_token_ids), hidden, meta, kv_cache)

    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, hidden] MTP outputs -> float32 logits [N, vocab] through the shared head."""
        assert self.mtp is not None, "this slice holds no MTP module"
        return self.slice.tp.all_gather(self.linear(self.mtp.shared_head_norm(h), self.lm_head, "lm_head").float(),
                                        dim=-1)

    def forward_layers(self, h: torch.Tensor, meta: AttnMetadata, kv_caches: dict[int, torch.Tensor] | None,
                       before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """h: [T, hidden] -> [T, hidden] through this slice's layers. kv_caches maps layer id -> flat cache.
        ``before_layer(layer_id)`` runs before each layer (a layer-wise load's wait for that layer's blocks)."""
        residual = None
        for key, layer in self.layers.items():
            if before_layer is not None:
                before_layer(int(key))
            h, residual = layer(h, residual, meta, None if kv_caches is None else kv_caches[int(key)])
        return h if residual is None else residual + h

    def use_kernels(self, on: bool) -> None:
        """Run the fused Triton kernels (``moeserve/kernels``) instead of the eager ops where they apply."""
        for module in self.modules():
            for flag in ("fused", "fused_router", "fused_shared"):
                if hasattr(module, flag):
                    setattr(module, flag, on)

    def fuse_input_projections(self) -> None:
        """One GEMM for each attention's query and latent projections (``MLA.fuse_input_projections``)."""
        for module in self.modules():
            if isinstance(module, MLA):
                module.fuse_input_projections()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden] (the rows to sample from) -> float32 logits [N, vocab] (each tp rank computes its
        vocabulary share; the shares are gathered)."""
        return self.slice.tp.all_gather(self.linear(self.norm(h), self.lm_head, "lm_head").float(), dim=-1)

    def forward(self, token_ids: torch.Tensor, meta: AttnMetadata,
                kv_caches: dict[int, torch.Tensor] | None, all_logits: bool = False) -> torch.Tensor:
        """Whole model on one rank: token_ids [T] -> logits [B, vocab] at each sequence's last new token
        (or [T, vocab] for every token with ``all_logits``)."""
        h = self.forward_layers(self.embed(token_ids), meta, kv_caches)
        return self.logits(h if all_logits else h[meta.logits_index])

    def cache_bytes_per_token(self, cache_dtype: torch.dtype | None = None) -> int:
        """Latent-cache bytes one token takes across this slice's layers (and its MTP module's)."""
        dtype = cache_dtype or self.dtype
        return (len(self.layers) + int(self.mtp is not None)) * self.config.kv_cache_dim * torch.empty((), dtype=dtype).element_size()
