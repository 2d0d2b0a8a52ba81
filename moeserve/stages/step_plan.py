"""The plan of one step as plain data (lists of ints), so that it can travel to stage workers as a msgpack
message, the array form of its block tables, and how its placeholder tokens are filled in on the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from moeserve.device_copy import to_device


@dataclass
class StepPlan:
    token_ids: list[int]  # [T] new tokens of every sequence, concatenated (decode sequences first)
    query_lens: list[int]  # [B]
    num_computed: list[int]  # [B] tokens already cached per sequence
    block_tables: Sequence[Sequence[int]]  # [B][n_blocks]
    sample_rows: list[int]  # sequences whose last new token's logits are needed
    # async scheduling (one process only): token_ids[pending_rows[i]] is a placeholder for the token that
    # the batch before sampled in its row pending_src[i]; the runner copies it there on the device
    pending_rows: list[int] = field(default_factory=list)  # ascending
    pending_src: list[int] = field(default_factory=list)
    # speculative decoding: per sequence, how many of its new tokens are drafts to verify (empty: none). A
    # sample row then gets logits at its last num_spec + 1 tokens (rows in that order, sequence by sequence)
    num_spec: list[int] = field(default_factory=list)
    # layer-wise loads (kvstore/layer_ready.py) whose blocks this step reads: layer L runs once their layer L is in
    wait_loads: list[int] = field(default_factory=list)

    @property
    def samples_every_row(self) -> bool:
        return len(self.sample_rows) == len(self.query_lens)

    def expanded(self) -> StepPlan:
        """The plan the model runs: each sequence that verifies k drafts becomes k + 1 decode rows (row j at
        position c + j, attending to the c + j + 1 tokens before and at it, through the same block table).
        Tokens, positions and cache slots stay those of the plan; the attention takes MLA's absorbed decode
        form (and a CUDA graph's decode shape), and every row of a sampled verify sequence is a sample row, so
        the logits come back at its last k + 1 positions, in order. The cache is written before attention
        reads it, so row j sees the latents of rows < j of the same step."""
        if not any(self.num_spec):
            return self
        for q, k in zip(self.query_lens, self.num_spec):
            assert not k or q == k + 1, "drafts ride on a decode only"
        return self._as_rows([k > 0 for k in self.num_spec], every_row_sampled=True)

    def short_chunks_as_rows(self, max_query: int) -> StepPlan:
        """The plan with its prefill chunks as decode rows (as ``expanded`` makes them of a verify) where every
        chunk is short over a long context: at most ``max_query`` tokens over at least as many cached ones (a
        prefix hit's suffix, the tail of a prompt whose blocks came from a prefill instance). The step then
        takes MLA's absorbed decode form and a CUDA graph's decode shape instead of up-projecting each
        chunk's whole context in every layer; a sampled chunk's one sample row is its last. Unchanged where
        a chunk is longer (the prefill form runs for it anyway) or where there is none. Call it on an
        ``expanded`` plan."""
        assert not any(self.num_spec), "expand the verify rows first"
        chunks = [q > 1 for q in self.query_lens]
        if not any(chunks) or any(q > 1 and (q > max_query or c < q)
                                  for q, c in zip(self.query_lens, self.num_computed)):
            return self
        return self._as_rows(chunks, every_row_sampled=False)

    @property
    def num_decode_rows(self) -> int:
        """Sequences of one new token (they come first)."""
        return sum(q == 1 for q in self.query_lens)

    def _as_rows(self, split: Sequence[bool], every_row_sampled: bool) -> StepPlan:
        """Each sequence i with ``split[i]`` as one decode row per new token; a sampled one's rows all sampled
        (``every_row_sampled``) or its last."""
        query_lens: list[int] = []
        num_computed: list[int] = []
        tables: list[Sequence[int]] = []
        sample_rows: list[int] = []
        sampled = set(self.sample_rows)
        for i, (q, c, table) in enumerate(zip(self.query_lens, self.num_computed, self.block_tables)):
            rows = q if split[i] else 1
            if i in sampled:
                first = len(query_lens)
                sample_rows.extend(range(first, first + rows) if every_row_sampled else [first + rows - 1])
            query_lens += [1] * q if rows > 1 else [q]
            num_computed += list(range(c, c + q)) if rows > 1 else [c]
            tables += [table] * rows
        return StepPlan(self.token_ids, query_lens, num_computed, tables, sample_rows, self.pending_rows,
                        self.pending_src, wait_loads=self.wait_loads)


def pad_tables(block_tables: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged block tables -> [B, max_blocks] int64, zero-padded (padding entries are never read).

    NOTE: one flat array and one masked assignment; a tensor per row cost about 30 us each, 8 ms a step at
    batch 256 on this project's CPU."""
    lengths = np.fromiter((len(t) for t in block_tables), dtype=np.int64, count=len(block_tables))
    out = np.zeros((len(block_tables), int(lengths.max(initial=0))), dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(chain.from_iterable(block_tables), np.int64)
    return out


class PaddedTables:
    """``pad_tables`` kept from step to step: the array of the step before, with only the rows whose table
    changed written again.

    In-process, a sequence's table is the same tuple object from step to step until it gains a block
    (``KVCacheManager.allocate_slots``), so between two decode steps of the same batch most rows are equal
    by identity (one C-level compare each); a batch of another size or width, or one with many changed
    rows, is padded from scratch. Plans that arrive as messages (stage workers) have new lists each step and
    are always padded from scratch. Each call returns a new array (the last one may still be read)."""

    def __init__(self) -> None:
        self._tables: list[Sequence[int]] = []  # held, so that no table's id is reused while compared
        self._array: np.ndarray | None = None

    def __call__(self, block_tables: Sequence[Sequence[int]]) -> np.ndarray:
        """What ``pad_tables(block_tables)`` returns."""
        last, array = self._tables, self._array
        num = len(block_tables)
        if array is None or num != len(last) or not num:
            return self._keep(block_tables, pad_tables(block_tables))
        changed = [i for i, (t, u) in enumerate(zip(block_tables, last)) if t is not u]
        width = max(map(len, block_tables))
        if len(changed) > num // 4 or width != array.shape[1]:
            return self._keep(block_tables, pad_tables(block_tables))
        out = array.copy()
        for i in changed:
            table = block_tables[i]
            out[i, :len(table)] = table
            out[i, len(table):] = 0
        return self._keep(block_tables, out)

    def _keep(self, block_tables: Sequence[Sequence[int]], array: np.ndarray) -> np.ndarray:
        self._tables, self._array = list(block_tables), array
        return array


def decode_rows(plan: StepPlan, tables: np.ndarray, block_size: int) -> np.ndarray:
    """A decode plan's graph inputs: [4, B] rows of token id, position, cache slot and context length
    (``tables``: the plan's block tables as an array, [>= B, >= blocks]); what ``build_attn_metadata``
    computes on the device for the eager path."""
    pos = np.asarray(plan.num_computed, dtype=np.int64)
    rows = np.arange(len(pos))
    slots = tables[rows, pos // block_size].astype(np.int64) * block_size + pos % block_size
    return np.stack([np.asarray(plan.token_ids, dtype=np.int64), pos, slots, pos + 1])


def fill_pending(token_ids: torch.Tensor, plan: StepPlan, prev_token_ids: torch.Tensor | None) -> None:
    """Write the previous batch's sampled ids (``prev_token_ids`` [R], on the device) into the plan's
    placeholder positions of ``token_ids`` [>= T] (on the device), in place and without a host sync."""
    rows, src = plan.pending_rows, plan.pending_src
    if not rows:
        return
    if prev_token_ids is None:
        raise ValueError("the plan has placeholder tokens but no previous sampled ids were given")
    k = len(rows)
    if rows[-1] == k - 1 and src == list(range(k)):  # the common case: rows 0..k-1 from rows 0..k-1
        token_ids[:k].copy_(prev_token_ids[:k])
        return
    index = to_device(torch.tensor([rows, src], dtype=torch.long), token_ids.device)
    token_ids.index_copy_(0, index[0], prev_token_ids.index_select(0, index[1]))


@dataclass
class DraftPlan:
    """One pass of the MTP module on the last stage (model/mtp.py), after a step's tokens were verified.

    ``step`` places the pass like a step plan: its token ids are the tokens t+1, its positions (num_computed,
    query_lens, block tables) the positions t, where the module's own latent cache is written; logits come
    back at the last token of each ``sample_rows`` sequence. ``hidden_rows`` [T]: where each row's hidden
    state is -- a row of the verified step's output, or, ``chained``, a row of the previous pass's sampled
    outputs (the module's own output stands in for the main model's at the next position)."""

    step: StepPlan
    hidden_rows: list[int]
    chained: bool = False

    def decode_form(self) -> tuple[StepPlan, list[int]]:
        """(the pass as decode rows -- each of a sequence's rows at its own position, as a verify step is
        expanded, so that the pass takes MLA's absorbed decode form and a CUDA graph's decode shape --, and
        the rows of that plan whose outputs are sampled: the last row of each ``sample_rows`` sequence)."""
        step = self.step
        ends = np.cumsum(step.query_lens)
        last_rows = [int(ends[i]) - 1 for i in step.sample_rows]
        if all(q == 1 for q in step.query_lens):
            return step, last_rows
        multi = StepPlan(step.token_ids, step.query_lens, step.num_computed, step.block_tables, step.sample_rows,
                         num_spec=[q - 1 for q in step.query_lens])
        return multi.expanded(), last_rows
