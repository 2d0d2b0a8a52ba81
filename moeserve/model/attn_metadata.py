"""Per-step attention metadata over a paged latent cache, built with tensor ops (no loop over sequences).

A step holds B sequences; sequence b contributes ``query_lens[b]`` new tokens at positions
``num_computed[b] ..`` and attends to ``num_computed[b] + query_lens[b]`` cached tokens. Decode sequences
(one new token) come first: they use MLA's absorbed form; the rest (prefill chunks) the expanded form.
Every layer shares one block table per sequence, so this metadata is built once per step; the forms only
one path reads (the eager decode's mask, the eager prefill's padded tensors, the prefill kernel's packed
ones) are built on first use, so a step builds what its layers read and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PaddedPrefill:
    """The prefill sequences padded to [Bp, Qp] queries and [Bp, Lp] context rows: the eager SDPA's form."""

    query_index: torch.Tensor  # [Bp, Qp] index into the T new tokens (padded with 0)
    query_valid: torch.Tensor  # [Bp, Qp] bool
    context_slots: torch.Tensor  # [Bp, Lp] cache slot of each context token (padded with 0)
    mask: torch.Tensor  # [Bp, Qp, Lp] bool: may query i attend to context token j


@dataclass
class PrefillMetadata:
    """The step's Bp prefill sequences; their new tokens follow the decode tokens, one run per sequence."""

    block_tables: torch.Tensor  # [Bp, max_blocks]
    num_computed: torch.Tensor  # [Bp] tokens already cached: the prefix a chunk attends to before its own
    query_start: torch.Tensor  # [Bp + 1] where each sequence's new tokens start among the step's T tokens
    max_query_len: int
    max_context_len: int
    num_context_tokens: int  # the context lengths (num_computed + new tokens) summed
    block_size: int

    @property
    def num_seqs(self) -> int:
        return int(self.num_computed.shape[0])

    @cached_property
    def context_lens(self) -> torch.Tensor:  # [Bp]
        return self.num_computed + self.query_start.diff()

    @cached_property
    def context_start(self) -> torch.Tensor:
        """[Bp + 1] where each sequence's context starts among the packed rows of ``context_rows``."""
        return F.pad(torch.cumsum(self.context_lens, 0), (1, 0))

    @cached_property
    def context_rows(self) -> torch.Tensor:
        """[Nc] cache slot of every context token, packed (varlen): sequence b's cached prefix, then its new
        tokens, are rows ``context_start[b]:context_start[b + 1]``. The prefill kernel's form."""
        device, n = self.num_computed.device, self.num_context_tokens
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), self.context_lens, output_size=n)
        j = torch.arange(n, device=device) - self.context_start[seq]
        return self.block_tables[seq, j // self.block_size] * self.block_size + j % self.block_size

    @cached_property
    def padded(self) -> PaddedPrefill:
        device = self.num_computed.device
        query_lens = self.query_start.diff()
        i = torch.arange(self.max_query_len, device=device)
        q_valid = i.unsqueeze(0) < query_lens.unsqueeze(1)  # [Bp, Qp]
        q_index = torch.where(q_valid, self.query_start[:-1].unsqueeze(1) + i, torch.zeros_like(i))
        j = torch.arange(self.max_context_len, device=device)
        ctx_valid = j.unsqueeze(0) < self.context_lens.unsqueeze(1)  # [Bp, Lp]
        block_idx = (j // self.block_size).clamp(max=self.block_tables.shape[1] - 1)
        slots = self.block_tables[:, block_idx] * self.block_size + (j % self.block_size)
        causal = j.view(1, 1, -1) <= (self.num_computed.view(-1, 1, 1) + i.view(1, -1, 1))  # [Bp, Qp, Lp]
        mask = causal & ctx_valid.unsqueeze(1) & q_valid.unsqueeze(2)
        # padded query rows attend to slot 0 only, so softmax never sees an all-masked row
        mask = mask | ((~q_valid).unsqueeze(2) & (j == 0).view(1, 1, -1))
        return PaddedPrefill(query_index=q_index, query_valid=q_valid,
                             context_slots=torch.where(ctx_valid, slots, torch.zeros_like(slots)), mask=mask)


@dataclass
class AttnMetadata:
    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache row where each new token's latent is written
    num_decode_tokens: int  # the first Nd tokens are the decode sequences', one each
    block_size: int
    decode_block_tables: torch.Tensor  # [Bd, nb] the blocks of each decode sequence's context
    decode_context_lens: torch.Tensor  # [Bd] context length of each decode sequence (read on the device)
    logits_index: torch.Tensor  # [B] index of each sequence's last new token
    prefill: PrefillMetadata | None = None  # None: no prefill sequence in the step

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_prefill_seqs(self) -> int:
        return 0 if self.prefill is None else self.prefill.num_seqs

    @cached_property
    def decode_length_groups(self) -> list[tuple[torch.Tensor | None, int]]:
        """The decode sequences in groups of similar context length, for the eager decode that pads each group
        to its longest: (row index or None for every row, blocks of the group's longest context). One group on
        a GPU (the lengths stay on the device) or where padding to the longest at most doubles the rows. On a
        CPU one long context among short ones would otherwise have every sequence of the step gather and
        multiply its length in rows: a group starts where a length passes twice the group's shortest. Built
        once per step, on the first layer's use."""
        whole: list[tuple[torch.Tensor | None, int]] = [(None, int(self.decode_block_tables.shape[1]))]
        if self.decode_context_lens.device.type != "cpu" or self.decode_context_lens.numel() < 2:
            return whole
        lens = self.decode_context_lens.tolist()
        if len(lens) * max(lens) <= 2 * sum(lens):
            return whole
        groups: list[list[int]] = []
        for i in sorted(range(len(lens)), key=lens.__getitem__):
            if groups and lens[i] <= 2 * lens[groups[-1][0]]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return [(torch.tensor(g), -(-max(lens[i] for i in g) // self.block_size)) for g in groups]

    @cached_property
    def decode_context_valid(self) -> torch.Tensor:
        """[Bd, nb * block_size] bool: which slots of ``decode_block_tables`` hold each sequence's tokens.

        NOTE: derived on the device from ``decode_context_lens`` (a static-size arange, no host sync), so a
        CUDA graph that captures it replays it for any lengths; built once per step, on first use."""
        width = self.decode_block_tables.shape[1] * self.block_size
        j = torch.arange(width, device=self.decode_context_lens.device)
        return j.unsqueeze(0) < self.decode_context_lens.unsqueeze(1)


class MetadataSizes(NamedTuple):
    """The sizes ``build_attn_metadata`` needs on the host, computed from the plan's lists: with them it reads
    no value back from the device (each such read waits for every kernel queued before it)."""

    num_decode: int
    num_tokens: int
    max_decode_context: int  # over the decode sequences
    max_prefill_query: int
    max_prefill_context: int
    num_prefill_context_tokens: int  # the prefill sequences' context lengths summed

    @classmethod
    def of(cls, num_computed: np.ndarray, query_lens: np.ndarray) -> MetadataSizes:
        """From host arrays [B]; checks that the decode sequences come first."""
        is_decode = query_lens == 1
        num_decode = int(is_decode.sum())
        if num_decode and not bool(is_decode[:num_decode].all()):
            raise ValueError("decode sequences (query_len == 1) must come before prefill sequences")
        context = num_computed + query_lens
        return cls(num_decode, int(query_lens.sum()), int(context[:num_decode].max(initial=0)),
                   int(query_lens[num_decode:].max(initial=0)), int(context[num_decode:].max(initial=0)),
                   int(context[num_decode:].sum()))


def build_attn_metadata(block_tables: torch.Tensor, num_computed: torch.Tensor, query_lens: torch.Tensor,
                        block_size: int, sizes: MetadataSizes | None = None) -> AttnMetadata:
    """Build the metadata of one step.

    block_tables: [B, max_blocks] physical block ids (padding entries are never read);
    num_computed: [B] tokens already in the cache; query_lens: [B] new tokens this step (>= 1).
    Sequences with ``query_lens == 1`` must come first. ``sizes``: the same lists' sizes from the host (the
    runner's hot path); without them they are read back from the tensors.
    """
    device = block_tables.device
    if sizes is None:
        sizes = MetadataSizes.of(num_computed.cpu().numpy(), query_lens.cpu().numpy())
    num_decode = sizes.num_decode
    query_start = F.pad(torch.cumsum(query_lens, 0), (1, 0))
    seq_of_token = torch.repeat_interleave(torch.arange(query_lens.shape[0], device=device), query_lens,
                                           output_size=sizes.num_tokens)
    offset = torch.arange(sizes.num_tokens, device=device) - query_start[seq_of_token]
    positions = num_computed[seq_of_token] + offset
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    num_dec_blocks = -(-sizes.max_decode_context // block_size)
    prefill = None
    if num_decode < query_lens.shape[0]:
        prefill = PrefillMetadata(
            block_tables=block_tables[num_decode:], num_computed=num_computed[num_decode:],
            query_start=query_start[num_decode:], max_query_len=sizes.max_prefill_query,
            max_context_len=sizes.max_prefill_context, num_context_tokens=sizes.num_prefill_context_tokens,
            block_size=block_size)
    return AttnMetadata(
        positions=positions, slot_mapping=slot_mapping, num_decode_tokens=num_decode, block_size=block_size,
        decode_block_tables=block_tables[:num_decode, :num_dec_blocks],
        decode_context_lens=(num_computed + query_lens)[:num_decode], logits_index=query_start[1:] - 1,
        prefill=prefill)
