"""CUDA graphs of the decode step, one per batch-size bucket (``--enforce-eager`` turns them off).

A decode step (every sequence adds one token) is captured once per bucket at start and replayed with its
inputs copied into static buffers: the step's thousands of kernel launches become one graph launch. A batch
is padded up to the next bucket; padding rows read and write only a spare cache block (``sink_block``, one
past the blocks the cache manager hands out) and are not counted as routed tokens. Prefill and mixed steps
run eagerly. Reference: ``ModelRunner.execute_stage``'s eager path, which the graphs must match.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from moeserve.model.attn_metadata import AttnMetadata
from moeserve.stages.step_plan import StepPlan, decode_rows, fill_pending

if TYPE_CHECKING:
    from moeserve.stages.runner import ModelRunner

logger = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, then steps of 8 up to 64, 16 up to 128, 32 up to 256 and 64 beyond,
    up to ``max_batch``: a step pads at most a quarter of its rows (or 7), which a memory-bound decode step
    barely feels, and start-up captures 19 graphs for 256 sequences rather than 35."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    size, step = 8, 8
    while size <= max_batch:
        sizes.append(size)
        step = 8 if size < 64 else 16 if size < 128 else 32 if size < 256 else 64
        size += step
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    kind = "decode"  # what the graphs run, for the log

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks_per_seq: int, sink_block: int,
                 keep_hidden: bool = False):
        """``keep_hidden``: on the last stage, the graphs also leave the step's hidden states (``hidden_rows``)
        for the MTP module's pass after the step (speculative decoding)."""
        self.runner = runner
        self.buckets = decode_buckets(max_batch)
        self.sink_block = sink_block
        self.block_size = runner.block_size
        model, device = runner.model, runner.device
        big = self.buckets[-1]
        # NOTE: inputs are staged in pinned host buffers and copied asynchronously. The engine queues step N+1
        # while the device runs step N, so two sets of staging buffers alternate, and a set is written again
        # only once the copies out of it two steps ago have run (``copied``): usually long done.
        self.staging = [(torch.zeros(4, big, dtype=torch.long, pin_memory=True),  # token, position, slot, length
                         torch.zeros(big, max_blocks_per_seq, dtype=torch.int32, pin_memory=True))
                        for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.num_runs = 0
        self.inputs = torch.zeros(4, big, dtype=torch.long, device=device)
        self.tables = torch.full((big, max_blocks_per_seq), sink_block, dtype=torch.int32, device=device)
        self.counted = torch.zeros(big, dtype=torch.long, device=device)  # 1 for real rows: the MoE counters skip padding
        self.hidden_in = None if model.slice.has_embedding else \
            torch.zeros(big, model.config.hidden_size, dtype=model.dtype, device=device)
        self.out: torch.Tensor | None = None  # logits [big, vocab] or hidden [big, hidden], filled by the graphs
        self.keep_hidden = keep_hidden and model.slice.has_head
        self.hidden_out: torch.Tensor | None = None  # [big, hidden] with keep_hidden
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool_bytes = 0

    def fits(self, plan: StepPlan) -> bool:
        return all(q == 1 for q in plan.query_lens) and len(plan.query_lens) <= self.buckets[-1]

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    # ---- capture ----
    def _forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits or, before the last stage, hidden states; the hidden states)."""
        model = self.runner.model
        meta = graph_metadata(self.inputs, self.tables, batch, self.block_size)
        h = model.embed(self.inputs[0, :batch]) if self.hidden_in is None else self.hidden_in[:batch]
        h = model.forward_layers(h, meta, self.runner.flat_caches)
        return (model.logits(h) if model.slice.has_head else h), h

    def _set_padding(self, buf: int, batch: int, num_real: int) -> None:
        """Rows [num_real, batch) of staging buffer set ``buf``: token 0 at position 0 in the sink block."""
        rows, tables = self.staging[buf]
        host = rows.numpy()
        host[0, num_real:batch] = 0
        host[1, num_real:batch] = 0
        host[2, num_real:batch] = self.sink_block * self.block_size
        host[3, num_real:batch] = 1
        tables.numpy()[num_real:batch, 0] = self.sink_block

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool; prints how long it took."""
        start = time.perf_counter()
        device = self.inputs.device
        before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        self.counted.zero_()
        moes = self.runner.model.moe_layers().values()
        for moe in moes:  # the graphs weigh their counts by ``counted``; eager steps count every row
            moe.count_weights = self.counted
        try:
            self._capture_all(pool)
        finally:
            for moe in moes:
                moe.count_weights = None
        torch.cuda.synchronize(device)
        self.pool_bytes = torch.cuda.memory_reserved(device) - before
        logger.info("captured CUDA graphs for %d %s batch sizes (1..%d) in %.1f s; graph memory %.0f MiB",
                    len(self.buckets), self.kind, self.buckets[-1], time.perf_counter() - start,
                    self.pool_bytes / 2**20)

    def _capture_all(self, pool) -> None:
        device = self.inputs.device
        for i, batch in enumerate(reversed(self.buckets)):
            self._set_padding(0, batch, 0)
            self._stage(0, batch, 0)
            # eager runs before capture compile this size's kernel variants and settle the allocator; the
            # largest size, first, grows the allocator and takes two, each smaller one fits in what it left
            for _ in range(2 if i == 0 else 1):
                out, h = self._forward(batch)
            if self.out is None:  # sized by the largest bucket, outside the pool; every graph writes into it
                self.out = torch.empty(batch, *out.shape[1:], dtype=out.dtype, device=device)
                if self.keep_hidden:
                    self.hidden_out = torch.empty(batch, h.shape[1], dtype=h.dtype, device=device)
            del out, h
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out, h = self._forward(batch)
                self.out[:batch].copy_(out)
                if self.hidden_out is not None:
                    self.hidden_out[:batch].copy_(h)
            self.graphs[batch] = graph

    # ---- replay ----
    def _stage(self, buf: int, batch: int, num_real: int) -> None:
        """Copy the staged inputs of ``batch`` rows to the device buffers the graphs read.

        NOTE: whole buffers, or whole rows, only: a strided slice of pinned memory (``[:, :batch]``) is first
        made contiguous in ordinary pageable memory, and a copy from there may wait for the device."""
        self.inputs.copy_(self.staging[buf][0], non_blocking=True)  # [4, max batch], 8 bytes each
        self.counted[:batch].fill_(0)
        self.counted[:num_real].fill_(1)

    def run(self, plan: StepPlan, hidden: torch.Tensor | None,
            prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the graph of the plan's bucket -> logits (or hidden states) of the plan's real rows.
        ``prev_token_ids``: the previous batch's sampled ids on the device, for the plan's placeholders."""
        num_real = len(plan.query_lens)
        batch = self.bucket(num_real)
        buf = self.num_runs % 2
        self.num_runs += 1
        copied = self.copied[buf]
        if copied is not None:
            copied.synchronize()  # this set's copies of two steps ago have run: it is free again
        padded = self.runner.padded_tables(plan.block_tables)
        width = padded.shape[1]
        rows, tables = self.staging[buf]
        tables.numpy()[:num_real, :width] = padded
        rows.numpy()[:, :num_real] = decode_rows(plan, padded, self.block_size)
        self._set_padding(buf, batch, num_real)
        self._stage(buf, batch, num_real)
        self.tables[:batch].copy_(tables[:batch], non_blocking=True)  # whole rows: contiguous (see _stage)
        self.copied[buf] = event = torch.cuda.Event()
        event.record()
        fill_pending(self.inputs[0], plan, prev_token_ids)
        if self.hidden_in is not None:
            assert hidden is not None
            self.hidden_in[:num_real].copy_(hidden)
        self.graphs[batch].replay()
        assert self.out is not None
        return self.out[:num_real]

    def hidden_rows(self, num_real: int) -> torch.Tensor:
        """The last replay's hidden states [num_real, hidden] (``keep_hidden``; overwritten by the next)."""
        assert self.hidden_out is not None, "these graphs keep no hidden states"
        return self.hidden_out[:num_real]

    def release(self) -> None:
        """Free the graphs (and with them their memory pool) and the static buffers (Engine.close)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.out = self.hidden_in = self.hidden_out = None


class DraftGraphs(DecodeGraphs):
    """CUDA graphs of the MTP module's pass (speculative decoding, ``ModelRunner.draft``), one per bucket:
    decode rows (``DraftPlan.decode_form``) that read token t+1 and a hidden state each; the graphs leave the
    logits of every row and the module's outputs (the hidden states a chained pass reads). Reference: the
    eager path of ``ModelRunner.draft``."""

    kind = "MTP draft"

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks_per_seq: int, sink_block: int):
        super().__init__(runner, max_batch, max_blocks_per_seq, sink_block, keep_hidden=True)
        model = runner.model
        assert runner.mtp_cache is not None and model.slice.has_head, "MTP draft graphs need the MTP module"
        self.mtp_cache = runner.mtp_cache.view(-1, runner.mtp_cache.shape[-1])
        self.hidden_in = torch.zeros(self.buckets[-1], model.config.hidden_size, dtype=model.dtype,
                                     device=runner.device)

    def _forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.runner.model
        meta = graph_metadata(self.inputs, self.tables, batch, self.block_size)
        assert self.hidden_in is not None
        h = model.mtp_forward(self.inputs[0, :batch], self.hidden_in[:batch], meta, self.mtp_cache)
        return model.mtp_logits(h), h


def graph_metadata(inputs: torch.Tensor, tables: torch.Tensor, batch: int, block_size: int) -> AttnMetadata:
    """The metadata a graph of ``batch`` rows captures, over views of its static buffers: ``inputs`` [4, >= B]
    (``decode_rows``' rows) and ``tables`` [>= B, max_blocks] (the full width: past a sequence's blocks the
    kernels and the eager mask read only up to its context length)."""
    return AttnMetadata(
        positions=inputs[1, :batch], slot_mapping=inputs[2, :batch], num_decode_tokens=batch,
        block_size=block_size, decode_block_tables=tables[:batch], decode_context_lens=inputs[3, :batch],
        logits_index=torch.arange(batch, device=inputs.device))
