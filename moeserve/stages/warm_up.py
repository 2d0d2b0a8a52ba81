"""The warm-up at a rank's start: a prefill and a decode step run on dummy rows before the first request, so
that what is built once -- kernels for the step's shapes, oneDNN's packed weights on CPU, the CPU expert
kernel's packing -- is built at start and not in the first request's steps.

Where it runs: with the fused kernels (GPUs; a large prefill, since the decode step's shapes are captured
as CUDA graphs), and for bfloat16 on CPU (``on_cpu``), where the first decode step at batch 64 took 178 ms
against 38 for the second (120 ms of it packing the routed experts for the C++ kernel and reordering
weights) and the first prefill step about 85 ms more than a later one (BENCHMARKS.md, issue 26). Every row
reads and writes the spare block past the cache manager's, so no request's cache is touched.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from moeserve.stages.step_plan import StepPlan

if TYPE_CHECKING:
    from moeserve.stages.runner import ModelRunner

logger = logging.getLogger(__name__)

MAX_DECODE_ROWS = 256  # a decode warm-up step's rows: the engine's decode batch, at most this many
# a CPU prefill warm-up's tokens, at most: enough for every weight to be packed and most experts reached, while
# a real checkpoint's full-size prefill would take many seconds of start-up on a CPU
CPU_PREFILL_TOKENS = 512


def on_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a CPU rank warms up: in bfloat16, where its oneDNN and C++ kernels build and pack at first use
    (float32 runs plain torch ops, and the tests' many small float32 engines would only pay for it)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def warm_up(runner: ModelRunner, sink_block: int, num_tokens: int, decode_rows: int = 0) -> None:
    """One prefill of ``num_tokens`` tokens and (``decode_rows``) one decode step of that many rows, every
    row in the spare block ``sink_block`` (their outputs are not used). The prefill's token ids are spread
    over the vocabulary, so that its rows route to many experts, as a real batch's do."""
    start = time.perf_counter()
    model = runner.model
    num_tokens = min(num_tokens, model.rotary.cos.shape[0])
    vocab = model.config.vocab_size
    if num_tokens:
        blocks = -(-num_tokens // runner.block_size)
        ids = [(i * 7919) % vocab for i in range(num_tokens)]
        run(runner, StepPlan(ids, [num_tokens], [0], [[sink_block] * blocks], [0]))
    rows = min(decode_rows, MAX_DECODE_ROWS)
    if rows:  # each row one token after a one-block context
        context = runner.block_size - 1
        ids = [(i * 7919) % vocab for i in range(rows)]
        run(runner, StepPlan(ids, [1] * rows, [context] * rows, [[sink_block]] * rows, list(range(rows))))
    logger.info("warm-up: a prefill of %d tokens and a decode step of %d rows in %.1f s", num_tokens, rows,
                time.perf_counter() - start)


def run(runner: ModelRunner, plan: StepPlan) -> None:
    """``plan`` through this rank's stage (zeros as the hidden input of a stage after the first)."""
    model = runner.model
    hidden = None if model.slice.has_embedding else \
        torch.zeros(len(plan.token_ids), model.config.hidden_size, dtype=model.dtype, device=runner.device)
    runner.execute_stage(plan, hidden)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
