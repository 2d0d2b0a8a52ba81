"""The fast path checks itself at start, one operation at a time, then its CUDA graphs.

1. A short prefill and a decode step run eagerly through the model, and the inputs that reach the first
   module of each fused kind (RMSNorm, RoPE, the router, the routed experts, MLA) are kept.
2. Each kind's kernel runs on those same inputs against its eager reference, with the other kinds eager
   (``op_checks.py``), and must agree within its own tolerance. The router is judged by the scores of the
   experts it picks, so a near-tie that the two paths break differently is not a fault.
3. With the kernels that passed, the decode step's CUDA graphs are captured and must reproduce the fused
   eager step (the same kernels on the same inputs).

A kind whose kernel fails or raises is turned off alone and the rest of the fast path stays on; a graph that
disagrees turns the graphs off. Each failure is logged with the kernel and the size of its error. The
whole-model difference between the fast and the eager path is logged too, for information only: through a
deep stack of routers, rounding differences flip near-tied expert choices, which is no fault of a kernel.
Every tensor-parallel rank of a stage takes the same decisions (their collectives must match).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from moeserve.stages.op_checks import (
    OpResult,
    capture_inputs,
    check_kind,
    present_kinds,
    relative_error,
    set_kinds,
)
from moeserve.stages.step_plan import StepPlan

if TYPE_CHECKING:
    from moeserve.stages.runner import ModelRunner

logger = logging.getLogger(__name__)

# relative L2 distance allowed between a graph's replay and the fused eager step it captured
GRAPH_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


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


def _check_kernels(runner: ModelRunner, plans: CheckPlans) -> tuple[list[OpResult], list[torch.Tensor]]:
    """Steps 1 and 2. -> (one result per kind that applies, the eager outputs of the check's plans)."""
    model = runner.model
    set_kinds(model, set())
    with capture_inputs(model) as inputs:
        ref = plans.run(runner)
    results = []
    for kind, captured in inputs.items():
        try:
            results.append(check_kind(model, kind, captured))
        except Exception as e:  # noqa: BLE001  (a kernel that fails to build or run: that kind stays eager)
            results.append(OpResult(kind, float("inf"), 0.0, f"{type(e).__name__}: {e}"))
    return results, ref


def _agree_across_ranks(runner: ModelRunner, failed: set[str], kinds: list[str]) -> set[str]:
    """The union of every tensor-parallel rank's failed ``kinds`` (all ranks must run the same kernels, and
    capture graphs or not alike)."""
    flags = torch.tensor([k in failed for k in kinds], dtype=torch.long, device=runner.device)
    if runner.model.slice.tp.size > 1:
        flags = runner.model.slice.tp.all_reduce(flags)
    return {k for k, f in zip(kinds, flags.tolist()) if f}


def check_fast_path(runner: ModelRunner, sink_block: int, capture) -> str | None:
    """Check each fused kernel, then ``capture()``'s graphs. -> None, or what was turned off and why."""
    model = runner.model
    kinds = sorted(present_kinds(model))
    if runner.block_size < 2:  # the check's prefill and decode share one block
        set_kinds(model, set(kinds))
        return None
    plans = CheckPlans(runner, sink_block)
    results, ref = _check_kernels(runner, plans)
    for r in results:
        logger.info("fast path check: %s", r.describe())
    failed = _agree_across_ranks(runner, {r.kind for r in results if not r.ok}, kinds)
    reasons = [r.describe() for r in results if not r.ok]
    if failed and not reasons:
        reasons.append("another tensor-parallel rank of this stage failed its check")
    set_kinds(model, set(kinds) - failed)
    try:
        fast = plans.run(runner)
    except Exception as e:  # noqa: BLE001  (kernels that pass alone but fail together: serve eagerly)
        failed = set(kinds)
        reasons.append(f"the fused step raised {type(e).__name__}: {e}")
        set_kinds(model, set())
        fast = ref
    for name, a, b in zip(("prefill", "decode"), fast, ref):
        logger.info("fast path check: the whole %s step differs from the eager ops by %.2e (relative L2; "
                    "informational: routing near-ties compound through the layers)", name, relative_error(a, b))
    graph_reason = _check_graphs(runner, plans, fast, capture) if capture is not None else None
    if graph_reason is not None:
        reasons.append(graph_reason)
    if failed:
        logger.warning("fused kernels off for %s (eager ops instead): %s", ", ".join(sorted(failed)),
                       "; ".join(reasons))
    elif graph_reason is not None:
        logger.warning("CUDA graphs off, decoding without them: %s", graph_reason)
    return "; ".join(reasons) if reasons else None


def _check_graphs(runner: ModelRunner, plans: CheckPlans, fast: list[torch.Tensor], capture) -> str | None:
    """Step 3: capture the graphs and replay the check's decode step. -> None, or why the graphs are off."""
    reason = None
    try:
        capture()
        replay = plans.run(runner)[1]
        err = relative_error(replay, fast[1])
        if err > GRAPH_TOLERANCE.get(runner.model.dtype, 2e-2):
            reason = f"the CUDA graph's decode differs from the fused eager step by {err:.2e} (relative L2)"
    except Exception as e:  # noqa: BLE001  (a capture that fails: decode without graphs)
        reason = f"CUDA graph capture failed: {type(e).__name__}: {e}"
    if _agree_across_ranks(runner, set() if reason is None else {"graphs"}, ["graphs"]) and reason is None:
        reason = "another tensor-parallel rank of this stage failed its graph check"
    if reason is not None:
        runner.graphs = None
    return reason
