"""The fast path checks itself at start: a short prefill and a decode step through the fused kernels (and the
decode step's CUDA graph) against the eager ops, on the spare cache block.

Any error, or a difference beyond the dtype's rounding, turns the fast path off for this process with a
warning that says why: serving goes on, eagerly, rather than with wrong tokens. Every tensor-parallel rank
of a stage takes the same decision (their collectives must match).
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

# relative L2 distance allowed between the fast and the eager outputs: several rounding steps per layer
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class CheckPlans:
    """A prefill of ``n - 1`` tokens and one decode step, all in the spare block ``sink_block``."""

    def __init__(self, runner: ModelRunner, sink_block: int):
        model = runner.model
        n = min(runner.block_size, 16)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        self.prefill = StepPlan(tokens[:-1], [n - 1], [0], [[sink_block]], [0])
        self.decode = StepPlan(tokens[-1:], [1], [n - 1], [[sink_block]], [0])
        self.hidden = None if model.slice.has_embedding else \
            torch.randn(n, model.config.hidden_size, generator=gen).to(runner.device, model.dtype)

    def run(self, runner: ModelRunner) -> list[torch.Tensor]:
        """-> the outputs (logits, or hidden states of a stage without the head) of both steps."""
        outs = []
        for plan, rows in ((self.prefill, slice(0, -1)), (self.decode, slice(-1, None))):
            hidden = None if self.hidden is None else self.hidden[rows]
            logits, h = runner.execute_stage(plan, hidden)
            outs.append((h if logits is None else logits).float().clone())
        return outs


def _agree(fast: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype, what: str) -> str | None:
    for name, a, b in zip(("prefill", "decode"), fast, ref):
        err = relative_error(a, b)
        if err > TOLERANCE.get(dtype, 5e-2):
            return f"{what} {name} differs from the eager ops by {err:.2e} (relative L2)"
    return None


def check_fast_path(runner: ModelRunner, sink_block: int, capture) -> str | None:
    """Compare kernels (then ``capture()``'s graphs) with the eager ops. -> None, or why it was turned off."""
    model = runner.model
    if runner.block_size < 2:  # the check's prefill and decode share one block
        model.use_kernels(True)
        return None
    plans = CheckPlans(runner, sink_block)
    reason = None
    try:
        model.use_kernels(False)
        ref = plans.run(runner)
        model.use_kernels(True)
        reason = _agree(plans.run(runner), ref, model.dtype, "the fused kernels'")
        if reason is None and capture is not None:
            capture()
            reason = _agree(ref[:1] + plans.run(runner)[1:], ref, model.dtype, "the CUDA graph's")
    except Exception as e:  # noqa: BLE001  (a kernel that fails to build or run: serve eagerly instead)
        reason = f"{type(e).__name__}: {e}"
    failed = torch.tensor([reason is not None], dtype=torch.long, device=runner.device)
    if int(model.slice.tp.all_reduce(failed)) and reason is None:
        reason = "another tensor-parallel rank of this stage failed its check"
    if reason is not None:
        model.use_kernels(False)
        logger.warning("fast path off (fused kernels and CUDA graphs), decoding eagerly: %s", reason)
    return reason


def warm_up(runner: ModelRunner, sink_block: int, num_tokens: int) -> None:
    """One prefill of ``num_tokens`` tokens, every row in the spare block (its output is not used): builds
    the kernels' large-batch variants and settles the allocator before the first request."""
    start = time.perf_counter()
    model = runner.model
    num_tokens = min(num_tokens, model.rotary.cos.shape[0])
    blocks = -(-num_tokens // runner.block_size)
    plan = StepPlan([0] * num_tokens, [num_tokens], [0], [[sink_block] * blocks], [0])
    hidden = None if model.slice.has_embedding else \
        torch.zeros(num_tokens, model.config.hidden_size, dtype=model.dtype, device=runner.device)
    runner.execute_stage(plan, hidden)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    logger.info("warm-up prefill of %d tokens in %.1f s", num_tokens, time.perf_counter() - start)
