"""One engine step's batch from its schedule to its outputs, and the engine's timings by phase.

A ``StepBatch`` is scheduled (``SchedulerOutput`` and the ``StepPlan`` built from it), launched on the
runner, sampled on the device (its ids stay there for the next batch's placeholders and are copied to the
host without a sync), and then processed. With async scheduling the engine launches batch N+1 before it
processes batch N, so batch N+1's plan marks the decode tokens that batch N sampled as placeholders.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.coordinator.request import Request
from moeserve.coordinator.sampling import SamplingBatch, make_sampling_batch
from moeserve.coordinator.sampling_batch import MIN_TOKENS
from moeserve.coordinator.scheduler import SchedulerOutput
from moeserve.device_copy import HostCopy
from moeserve.stages.step_plan import StepPlan

# the parts of Engine.step, in the order a synchronous step runs them (EngineStats.phase_s)
PHASES = ("schedule", "launch", "collect", "sample", "advance", "wait", "process", "draft")


@dataclass
class EngineStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    max_in_flight: int = 0  # most batches in flight at once (pipeline parallelism)
    # speculative decoding: drafts verified, drafts accepted, and verifications (a sequence's drafts in a step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_spec_verifies: int = 0
    step_times: list[float] = field(default_factory=list)
    # seconds the engine spent in each phase of its steps: where a step's time goes (see moeserve bench).
    # "launch" is the runner's submit: the model itself in one process on a CPU, kernel launches on a GPU;
    # "collect" waits for a distributed step's logits; "wait" for the sampled ids on the host.
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a sequence gets per verify step (accepted drafts + the drawn one); 0 before any."""
        n = self.num_spec_verifies
        return (self.num_accepted_tokens + n) / n if n else 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added, by name, to ``phase_s``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[name] += time.perf_counter() - start


@dataclass
class StepBatch:
    """A batch from its schedule to its outputs (see the module docstring)."""

    sched: SchedulerOutput
    plan: StepPlan
    to_sample: list[Request]  # the requests that get a token from this batch, in sample-row order
    handle: Any = None  # the runner's, until the logits are collected
    sampled_reqs: list[Request] = field(default_factory=list)  # the rows sampled (to_sample less finished)
    token_ids: torch.Tensor | None = None  # [len(sampled_reqs)] long on the device: read by the next batch
    host: HostCopy | None = None  # token ids, logprobs (and top logprobs) on their way to the host

    @property
    def is_sampled(self) -> bool:
        return self.host is not None

    def row_of(self) -> dict[Request, int]:
        """Each sampled request's row in ``token_ids``."""
        return {r: i for i, r in enumerate(self.sampled_reqs)}


def build_step_plan(sched: SchedulerOutput, prev: StepBatch | None) -> StepPlan:
    """The plan of a schedule (call it before the batch's own placeholders are counted). A sequence whose
    next token the batch before (``prev``) sampled but whose ids have not reached the host gets a
    placeholder there, and the runner copies the id in on the device.

    Per sequence only the list slicing; the lists the plan holds are built by comprehensions."""
    scheduled = sched.scheduled
    token_ids: list[int] = []
    pending_rows: list[int] = []
    pending_reqs: list[Request] = []
    for s in scheduled:
        r = s.request
        start = r.num_computed_tokens
        known = r.token_ids[start:start + s.num_new_tokens - s.num_spec_tokens]
        token_ids += known
        if s.num_spec_tokens:  # drafts to verify follow the decode's token
            token_ids += r.spec_token_ids[:s.num_spec_tokens]
        elif len(known) < s.num_new_tokens:  # the one token still on the device (a decode)
            pending_rows.append(len(token_ids))
            pending_reqs.append(r)
            token_ids.append(0)
    assert len(token_ids) == sched.num_batched_tokens, "only a decode's last token can be a placeholder"
    pending_src: list[int] = []
    if pending_reqs:
        assert prev is not None, "a placeholder needs the batch that sampled it"
        row_of = prev.row_of()
        pending_src = [row_of[r] for r in pending_reqs]
    return StepPlan(
        token_ids=token_ids, query_lens=[s.num_new_tokens for s in scheduled],
        num_computed=[s.request.num_computed_tokens for s in scheduled],
        block_tables=[s.block_table.block_ids for s in scheduled],
        sample_rows=[i for i, s in enumerate(scheduled) if s.completes_sequence],
        pending_rows=pending_rows, pending_src=pending_src,
        num_spec=[s.num_spec_tokens for s in scheduled] if any(s.num_spec_tokens for s in scheduled) else [])


def sampling_batch_of(reqs: list[Request], device: torch.device, eos_token_ids: tuple[int, ...],
                      token_bitmask: tuple[torch.Tensor, torch.Tensor] | None, with_history: bool
                      ) -> SamplingBatch:
    """The sampler's batch for these requests' next tokens. ``with_history``: some request's sampling reads
    its outputs so far (penalties), which are then all known on the host (a synchronous step); otherwise
    no output list is copied. The outputs each row had before this token count the placeholders of the
    batches still in flight, less this token's own."""
    num = len(reqs)
    params = [r.params for r in reqs]
    outputs = [r.output_token_ids for r in reqs] if with_history else [()] * num
    prompts = [r.prompt_token_ids for r in reqs] if with_history else [()] * num
    counts = [r.num_output_tokens + r.num_output_placeholders - 1 for r in reqs] \
        if any(p.min_tokens for p in params) else [0] * num  # read only under min_tokens
    return make_sampling_batch(params, outputs, prompts, [r.generator for r in reqs], device,
                               eos_token_ids=eos_token_ids, token_bitmask=token_bitmask, num_output_tokens=counts)


class SamplingBatchCache:
    """The last sampling batch the engine built, given again while the same requests are sampled in the same
    order and nothing that changes from step to step enters it: no output history (penalties), no grammar
    mask, no min_tokens count. A decode batch's sampling values are then those of the step before, and
    rebuilding them is a Python pass over its requests (and, on a GPU, a copy to the device) each step.

    Requests compare by identity (``Request`` is ``eq=False``), so the check is one C-level list compare."""

    def __init__(self) -> None:
        self._reqs: list[Request] = []
        self._batch: SamplingBatch | None = None

    def get(self, reqs: list[Request], device: torch.device, eos_token_ids: tuple[int, ...],
            token_bitmask: tuple[torch.Tensor, torch.Tensor] | None, with_history: bool) -> SamplingBatch:
        """What ``sampling_batch_of`` returns for these arguments."""
        per_step = token_bitmask is not None or with_history
        batch = self._batch
        if not per_step and batch is not None and batch.device == device and reqs == self._reqs:
            return batch
        batch = sampling_batch_of(reqs, device, eos_token_ids, token_bitmask, with_history)
        if per_step or batch.host_rows[MIN_TOKENS].any():
            self._reqs, self._batch = [], None
        else:
            self._reqs, self._batch = list(reqs), batch
        return batch
