"""The step of an Engine whose decoding sequences carry draft tokens (MTP speculative decoding): the part of
``EngineStep`` (engine_step.py) that verifies drafts and drafts the next ones (spec_decode.py)."""

from __future__ import annotations

import time

from moeserve.coordinator.engine_step import EngineStep
from moeserve.coordinator.outputs import RequestOutput
from moeserve.coordinator.request import Request
from moeserve.coordinator.spec_decode import can_draft
from moeserve.coordinator.step_batch import StepBatch


class SpeculativeStep(EngineStep):
    """``EngineStep`` with the speculative step that ``step()`` runs while a speculator is set."""

    def _step_speculative(self) -> list[RequestOutput]:
        """A synchronous step whose decoding sequences carry draft tokens: schedule -> launch -> collect ->
        verify -> process -> advance (by the kept tokens) -> draft the next step's tokens (spec_decode.py)."""
        assert self.speculator is not None and self.spec_policy is not None
        with self.stats.phase("schedule"):
            batch = self._schedule(None)
        if batch is None:
            return []
        with self.stats.phase("launch"):
            self._launch(batch, None)
        with self.stats.phase("collect"):
            logits = self.executor.collect(batch.handle).to(self.config.torch_device).float()
            batch.handle = None
        sampled = [batch.sched.scheduled[i] for i in batch.plan.sample_rows]
        num_spec = [s.num_spec_tokens for s in sampled]
        with self.stats.phase("sample"):
            reqs = batch.to_sample
            verified = self.speculator.verify(logits, reqs, num_spec, self.outputs.bitmask(
                [r for r, k in zip(reqs, num_spec) for _ in range(k + 1)]), bool(self._sync_request_ids))
        with self.stats.phase("process"):
            outputs = self._processed = self._process_verified(reqs, verified)
        for s, k, a in zip(sampled, num_spec, verified.num_accepted):
            s.num_rejected_tokens = k - a
            req = s.request
            req.spec_token_ids, req.spec_probs = [], None
            req.num_draft_tokens += k
            req.num_accepted_tokens += a
        with self.stats.phase("advance"):
            self.scheduler.advance(batch.sched)
        with self.stats.phase("draft"):
            self._draft(batch)
        self._record(batch, len(outputs))
        self._observe_speculation(batch, num_spec, verified.num_accepted)
        return outputs

    def _process_verified(self, reqs: list[Request], verified) -> list[RequestOutput]:
        now, outputs = time.monotonic(), []
        for req, ids, lps, tops, k, a in zip(reqs, verified.token_ids, verified.logprobs, verified.top,
                                             verified.num_spec, verified.num_accepted):
            req.num_output_placeholders -= 1
            out = self.outputs.process_tokens(req, ids, lps, tops, now, self.max_model_len)
            out.num_draft_tokens = req.num_draft_tokens + k
            out.num_accepted_draft_tokens = req.num_accepted_tokens + a
            outputs.append(out)
            if out.finished:
                self._retire(req)
        return outputs

    def _draft(self, batch: StepBatch) -> None:
        """Drafts for the next step, if speculation pays at this batch size (spec_policy.py)."""
        assert self.speculator is not None and self.spec_policy is not None
        config = self.speculator.config
        if config.adaptive and not self.spec_policy.wants_drafts(len(self.scheduler.running)):
            return
        k = config.num_speculative_tokens
        num_drafts = {s.request: min(k, s.request.max_total_tokens - s.request.num_tokens - 1)
                      for s in batch.sched.scheduled if can_draft(s.request)}
        self.speculator.draft(self.executor, batch.plan, batch.sched.scheduled, num_drafts)

    def _observe_speculation(self, batch: StepBatch, num_spec: list[int], num_accepted: list[int]) -> None:
        drafted = sum(num_spec)
        self.stats.num_draft_tokens += drafted
        self.stats.num_accepted_tokens += sum(num_accepted)
        self.stats.num_spec_verifies += sum(1 for k in num_spec if k)
        sched = batch.sched
        if sched.preempted or any(s.num_new_tokens - s.num_spec_tokens != 1 for s in sched.scheduled):
            return  # a prefill chunk's time says nothing of decoding
        assert self.spec_policy is not None
        self.spec_policy.observe(len(sched.scheduled), drafted > 0, len(sched.scheduled) + sum(num_accepted),
                                 self.stats.step_times[-1])
