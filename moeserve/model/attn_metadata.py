"""Per-step attention metadata over a paged latent cache, built with tensor ops (no loop over sequences).

A step holds B sequences; sequence b contributes ``query_lens[b]`` new tokens at positions
``num_computed[b] ..`` and attends to ``num_computed[b] + query_lens[b]`` cached tokens. Decode sequences
(one new token) come first: they use MLA's absorbed form; the rest (prefill chunks) the expanded form.
Every layer shares one block table per sequence, so this metadata is built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


@dataclass
class AttnMetadata:
    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache row where each new token's latent is written
    num_decode_tokens: int  # the first Nd tokens are the decode sequences', one each
    block_size: int
    decode_block_tables: torch.Tensor  # [Bd, nb] the blocks of each decode sequence's context
    decode_context_valid: torch.Tensor  # [Bd, nb * block_size] bool: which of those slots hold its tokens
    prefill_query_index: torch.Tensor  # [Bp, Qp] index into the T new tokens (padded with 0)
    prefill_query_valid: torch.Tensor  # [Bp, Qp] bool
    prefill_context_slots: torch.Tensor  # [Bp, Lp]
    prefill_mask: torch.Tensor  # [Bp, Qp, Lp] bool: may query i attend to context token j
    logits_index: torch.Tensor  # [B] index of each sequence's last new token
    # [Bd] context length of each decode sequence (read on the device by the paged decode kernel)
    decode_context_lens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_prefill_seqs(self) -> int:
        return int(self.prefill_query_index.shape[0])


class MetadataSizes(NamedTuple):
    """The sizes ``build_attn_metadata`` needs on the host, computed from the plan's lists: with them it reads
    no value back from the device (each such read waits for every kernel queued before it)."""

    num_decode: int
    num_tokens: int
    max_decode_context: int  # over the decode sequences
    max_prefill_query: int
    max_prefill_context: int

    @classmethod
    def of(cls, num_computed: np.ndarray, query_lens: np.ndarray) -> MetadataSizes:
        """From host arrays [B]; checks that the decode sequences come first."""
        is_decode = query_lens == 1
        num_decode = int(is_decode.sum())
        if num_decode and not bool(is_decode[:num_decode].all()):
            raise ValueError("decode sequences (query_len == 1) must come before prefill sequences")
        context = num_computed + query_lens
        return cls(num_decode, int(query_lens.sum()), int(context[:num_decode].max(initial=0)),
                   int(query_lens[num_decode:].max(initial=0)), int(context[num_decode:].max(initial=0)))


def _context_slots(block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, max_len: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """block_tables: [B, max_blocks], lengths: [B] -> (slots [B, L], valid [B, L]) with L = max_len."""
    j = torch.arange(max_len, device=block_tables.device)
    valid = j.unsqueeze(0) < lengths.unsqueeze(1)
    block_idx = (j // block_size).clamp(max=block_tables.shape[1] - 1) if max_len else j
    slots = block_tables[:, block_idx] * block_size + (j % block_size)
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def build_attn_metadata(block_tables: torch.Tensor, num_computed: torch.Tensor, query_lens: torch.Tensor,
                        block_size: int, sizes: MetadataSizes | None = None) -> AttnMetadata:
    """Build the metadata of one step.

    block_tables: [B, max_blocks] physical block ids (padding entries are never read);
    num_computed: [B] tokens already in the cache; query_lens: [B] new tokens this step (>= 1).
    Sequences with ``query_lens == 1`` must come first. ``sizes``: the same lists' sizes from the host (the
    runner's hot path); without them they are read back from the tensors.
    """
    device = block_tables.device
    num_seqs = int(query_lens.shape[0])
    if sizes is None:
        sizes = MetadataSizes.of(num_computed.cpu().numpy(), query_lens.cpu().numpy())
    num_decode, num_tokens = sizes.num_decode, sizes.num_tokens
    cu_q = torch.zeros(num_seqs + 1, dtype=torch.long, device=device)
    cu_q[1:] = torch.cumsum(query_lens, 0)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens,
                                           output_size=num_tokens)
    offset = torch.arange(num_tokens, device=device) - cu_q[seq_of_token]
    positions = num_computed[seq_of_token] + offset
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    context_lens = num_computed + query_lens

    dec_lens = context_lens[:num_decode]
    num_dec_blocks = -(-sizes.max_decode_context // block_size)
    dec_tables = block_tables[:num_decode, :num_dec_blocks]
    dec_valid = torch.arange(num_dec_blocks * block_size, device=device).unsqueeze(0) < dec_lens.unsqueeze(1)

    p_tables, p_computed, p_q = block_tables[num_decode:], num_computed[num_decode:], query_lens[num_decode:]
    p_ctx_slots, p_ctx_valid = _context_slots(p_tables, context_lens[num_decode:], block_size,
                                              sizes.max_prefill_context)
    max_q = sizes.max_prefill_query
    i = torch.arange(max_q, device=device)
    q_valid = i.unsqueeze(0) < p_q.unsqueeze(1)  # [Bp, Qp]
    q_index = torch.where(q_valid, cu_q[num_decode:-1].unsqueeze(1) + i, torch.zeros_like(i))
    j = torch.arange(p_ctx_slots.shape[1], device=device)
    causal = j.view(1, 1, -1) <= (p_computed.view(-1, 1, 1) + i.view(1, -1, 1))  # [Bp, Qp, Lp]
    mask = causal & p_ctx_valid.unsqueeze(1) & q_valid.unsqueeze(2)
    # padded query rows attend to slot 0 only, so softmax never sees an all-masked row
    mask = mask | ((~q_valid).unsqueeze(2) & (j == 0).view(1, 1, -1))
    return AttnMetadata(
        positions=positions, slot_mapping=slot_mapping, num_decode_tokens=num_decode,
        block_size=block_size, decode_block_tables=dec_tables, decode_context_valid=dec_valid,
        prefill_query_index=q_index, prefill_query_valid=q_valid,
        prefill_context_slots=p_ctx_slots, prefill_mask=mask, logits_index=cu_q[1:] - 1,
        decode_context_lens=dec_lens,
    )
