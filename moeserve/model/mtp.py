"""DeepSeek-V3's multi-token-prediction (MTP) module on local shapes.

The module of depth 1 (the DeepSeek-V3 report, section 2.2; the tensors of layer ``num_hidden_layers`` in
the Hugging Face checkpoints) predicts token t+2 from the main model's hidden state at t and the embedding
of token t+1::

    h'  = eh_proj([enorm(emb(t+1)) ; hnorm(h_t)])      # [T, 2 * hidden] -> [T, hidden]
    h'' = decoder block (MLA + MoE, its own latent cache) on h' at position t
    logits = head(shared_head.norm(h''))

``h_t`` is the main model's output after its final norm; the embedding at position 0 is zeroed, and the
embedding goes first in the concatenation -- as vLLM and SGLang load these checkpoints (the report writes
the pair the other way round). The embedding and the output head are the main model's (DeepSeek shares
them); the checkpoint's copies under the MTP layer are not read. For drafts past the first, the module
is chained: its own output ``h''`` stands in for the main model's hidden state at the next position.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.model.attn_metadata import AttnMetadata
from moeserve.model.config import ModelConfig
from moeserve.model.cpu_linear import PackedLinear
from moeserve.model.layers import RMSNorm


class MTPLayer(nn.Module):
    """enorm, hnorm, eh_proj, one decoder block (``block``, built by the model: its layer id is
    ``config.mtp_layer_id``) and the shared head's norm. Tensor parallelism: ``eh_proj`` is replicated
    (it is small), the block is sharded like every other layer."""

    def __init__(self, config: ModelConfig, block: nn.Module, dtype: torch.dtype | None):
        super().__init__()
        hidden = config.hidden_size
        self.layer_id = config.mtp_layer_id
        self.enorm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.eh_proj = nn.Parameter(torch.empty(hidden, 2 * hidden, dtype=dtype))
        self.block = block
        self.shared_head_norm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.linear = PackedLinear()

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor, meta: AttnMetadata,
                kv_cache: torch.Tensor | None) -> torch.Tensor:
        """embedded: [T, hidden] the embeddings of tokens t+1; hidden: [T, hidden] the main model's normed
        output at t (or this module's output at t-1, chained) -> [T, hidden] the block's output (before
        the shared head's norm). ``meta`` places row i at position t (its latent goes to this module's
        cache there)."""
        embedded = torch.where((meta.positions == 0).unsqueeze(-1), torch.zeros_like(embedded), embedded)
        x = self.linear(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1), self.eh_proj, "eh_proj")
        h, residual = self.block(x, None, meta, kv_cache)
        return residual + h
