"""Speculative decoding with DeepSeek's MTP module: verify a step's drafts, then draft the next step's.

A step (engine_spec_step.py) carries, after each decoding request's last token, up to K draft tokens; the main
model's logits at those K + 1 positions verify them (``verify``) by rejection sampling (Leviathan et al.,
Chen et al.): draft d_j, drawn from the draft distribution q_j, is accepted with probability
min(1, p_j(d_j) / q_j(d_j)) under the target distribution p_j (what ``Sampler.sample`` would draw from: the
request's temperature and top-k/top-p/min-p); the first rejected one is replaced by a draw from
norm(max(0, p_j - q_j)); if all are accepted a bonus token is drawn from p_K. Accepted tokens then follow p
exactly; for greedy requests p and q are one-hot, so the output is the plain greedy output token for token.

After the step's tokens are processed, ``draft`` runs the MTP module on the last stage over every row the
main model computed and kept (``DraftPlan``) -- writing the module's own latent cache there -- and samples
the first draft at each decoding request's last row; drafts 2..K chain the module on its own output. Drafts
are proposed only to requests whose sampling reads nothing of their previous outputs (no penalties, no
grammar, min_tokens reached): structured output and stop strings then hold for every accepted token as the
output processor checks each one in turn. The latents of rejected drafts stay in the cache past the
request's computed length, where nothing reads them before they are overwritten (no block is registered in
the prefix cache before its tokens are computed and verified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moeserve.coordinator.request import Request, RequestStatus
from moeserve.coordinator.sampling import Sampler
from moeserve.coordinator.scheduler import ScheduledRequest
from moeserve.coordinator.spec_config import SpeculativeConfig
from moeserve.coordinator.step_batch import sampling_batch_of
from moeserve.device_copy import HostCopy, to_device
from moeserve.stages.step_plan import DraftPlan, StepPlan

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor


def can_draft(req: Request) -> bool:
    """Whether a request takes drafts: its sampling must not read its previous outputs (penalties, a
    grammar) or count them (min_tokens not yet reached)."""
    params = req.params
    return not params.needs_previous_outputs and req.num_output_tokens >= params.min_tokens


@dataclass
class Verified:
    """Per verified request: the tokens it gets (accepted drafts, then one drawn token), their logprobs and
    (if asked) top logprobs, and how many drafts were accepted."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    top: list[list[dict[int, float] | None]]
    num_spec: list[int]  # drafts verified
    num_accepted: list[int]


class Speculator:
    """The coordinator's side of MTP speculative decoding; ``Executor.draft`` runs the module's passes."""

    def __init__(self, config: SpeculativeConfig, sampler: Sampler, eos_token_ids: tuple[int, ...],
                 device: torch.device):
        self.config = config
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.device = device

    # ---- verify ----
    def verify(self, logits: torch.Tensor, reqs: list[Request], num_spec: list[int],
               bitmask: Any, with_history: bool) -> Verified:
        """``logits`` [sum(k_i + 1), vocab]: request i's rows are its k_i = ``num_spec[i]`` draft positions
        and the one after them. ``bitmask``: ``OutputProcessor.bitmask`` of the rows (one per row)."""
        rows = [r for r, k in zip(reqs, num_spec) for _ in range(k + 1)]
        batch = sampling_batch_of(rows, logits.device, self.eos_token_ids, bitmask, with_history)
        if not any(num_spec):  # nothing to verify: the plain sampler, as without speculation
            return self._plain(logits, reqs, batch)
        top = None
        if batch.num_top_logprobs > 0:
            n = min(batch.num_top_logprobs, logits.shape[1])
            top = torch.log_softmax(logits.float(), dim=-1).topk(n, dim=-1)
        probs, logp = self.sampler.distribution(logits, batch)
        if batch.all_greedy:  # p one-hot: a draft is accepted iff it is the argmax, which replaces it if not
            target = probs.argmax(dim=-1)
            draft_rows, draft_ids, _ = self._drafts(reqs, num_spec, None)
            copies = [target, logp.gather(1, target[:, None]).squeeze(1), target[draft_rows] == draft_ids,
                      logp[draft_rows, draft_ids]]
            if top is not None:
                copies += [top.values, top.indices]
            return self._assemble(reqs, num_spec, HostCopy(copies).wait())
        draft_rows, draft_ids, q = self._drafts(reqs, num_spec, probs)
        accept_p = probs[draft_rows, draft_ids]
        accept = self._uniforms(reqs, num_spec).to(probs.device) * q[draft_rows, draft_ids] <= accept_p
        residual = (probs - q).clamp_min_(0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        dist = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(torch.float32).tiny), probs)
        drawn = self.sampler.draw(dist, batch)
        copies = [drawn, logp.gather(1, drawn[:, None]).squeeze(1), accept, logp[draft_rows, draft_ids]]
        if top is not None:
            copies += [top.values, top.indices]
        host = HostCopy(copies).wait()
        return self._assemble(reqs, num_spec, host)

    def _plain(self, logits: torch.Tensor, reqs: list[Request], batch: Any) -> Verified:
        out = self.sampler.sample(logits, batch)
        host = HostCopy([out.token_ids, out.logprobs, *(out.top_logprobs or ())]).wait()
        ids, lps = host[0].tolist(), host[1].tolist()
        top = (host[2].tolist(), host[3].tolist()) if len(host) > 2 else None
        tops = [[dict(zip(top[1][i][:r.params.logprobs], top[0][i][:r.params.logprobs]))
                 if top is not None and r.params.logprobs else None] for i, r in enumerate(reqs)]
        return Verified([[t] for t in ids], [[lp] for lp in lps], tops, [0] * len(reqs), [0] * len(reqs))

    def _drafts(self, reqs: list[Request], num_spec: list[int], probs: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows of the drafts [D], their ids [D], q [R, vocab]: each draft row's draft distribution, one-hot
        for greedy drafts, zero on the other rows; not built without ``probs``)."""
        device = probs.device if probs is not None else self.device
        q = torch.zeros_like(probs) if probs is not None else torch.zeros(0)
        rows: list[int] = []
        ids: list[int] = []
        greedy: list[bool] = []
        start = 0
        for req, k in zip(reqs, num_spec):
            if k:
                rows.extend(range(start, start + k))
                ids.extend(req.spec_token_ids[:k])
                greedy.extend([req.spec_probs is None] * k)
                if req.spec_probs is not None and probs is not None:
                    q[start:start + k] = req.spec_probs[:k]
            start += k + 1
        draft_rows = to_device(torch.tensor(rows, dtype=torch.long), device)
        draft_ids = to_device(torch.tensor(ids, dtype=torch.long), device)
        if probs is not None and any(greedy):
            pos = to_device(torch.tensor(greedy, dtype=torch.bool).nonzero().squeeze(1), device)
            q[draft_rows[pos], draft_ids[pos]] = 1.0
        return draft_rows, draft_ids, q

    @staticmethod
    def _uniforms(reqs: list[Request], num_spec: list[int]) -> torch.Tensor:
        """[D] uniform draws in (0, 1] for the acceptance tests (seeded requests from their generators)."""
        parts = []
        for req, k in zip(reqs, num_spec):
            if k:
                gen = req.generator if req.generator is not None and not req.params.greedy else None
                parts.append(1.0 - torch.rand(k, generator=gen))
        return torch.cat(parts) if parts else torch.zeros(0)

    @staticmethod
    def _assemble(reqs: list[Request], num_spec: list[int], host: list[torch.Tensor]) -> Verified:
        drawn, drawn_lp, accept, draft_lp = (h.tolist() for h in host[:4])
        top_values, top_ids = (host[4].tolist(), host[5].tolist()) if len(host) > 4 else (None, None)
        out = Verified([], [], [], list(num_spec), [])
        row = drow = 0
        for req, k in zip(reqs, num_spec):
            a = 0
            while a < k and accept[drow + a]:
                a += 1
            out.token_ids.append(req.spec_token_ids[:a] + [drawn[row + a]])
            out.logprobs.append(draft_lp[drow:drow + a] + [drawn_lp[row + a]])
            n = req.params.logprobs
            out.top.append([dict(zip(top_ids[row + j][:n], top_values[row + j][:n]))
                            if top_ids is not None and top_values is not None and n else None
                            for j in range(a + 1)])
            out.num_accepted.append(a)
            row, drow = row + k + 1, drow + k
        return out

    # ---- draft ----
    def draft(self, executor: Executor, plan: StepPlan, scheduled: list[ScheduledRequest], num_drafts: dict[Request, int]
              ) -> None:
        """Run the MTP module over the rows the step computed and kept, and give each request of
        ``num_drafts`` (request -> k > 0, a decoding request that can take drafts) its k next drafts."""
        first = self._first_pass(plan, scheduled, num_drafts)
        if first is None:
            return
        draft_plan, sampled, tables = first
        drafts: dict[Request, list[int]] = {r: [] for r in sampled}
        probs: dict[Request, list[torch.Tensor]] = {r: [] for r in sampled}
        logits = executor.draft(draft_plan)
        for j in range(1, max(num_drafts[r] for r in sampled) + 1):
            if j > 1:
                live = [i for i, r in enumerate(sampled) if num_drafts[r] >= j]
                sampled = [sampled[i] for i in live]
                logits = executor.draft(self._chained_pass(sampled, drafts, tables, live, j))
            tokens, q = self._sample_drafts(logits, sampled)
            for i, req in enumerate(sampled):
                drafts[req].append(tokens[i])
                if q is not None and not req.params.greedy:
                    probs[req].append(q[i])
        for req, ids in drafts.items():
            req.spec_token_ids = ids
            req.spec_probs = torch.stack(probs[req]) if probs[req] else None

    @staticmethod
    def _first_pass(plan: StepPlan, scheduled: list[ScheduledRequest], num_drafts: dict[Request, int]
                    ) -> tuple[DraftPlan, list[Request], dict[Request, Any]] | None:
        """The pass over every kept row of the requests that take drafts: row t (position t) reads the
        token t+1 and the main model's output at t. Sequences of one row go first (MetadataSizes).
        Returns (the pass, the requests it samples, in order, their block tables)."""
        starts = np.concatenate([[0], np.cumsum(plan.query_lens)[:-1]])
        sample_rows = set(plan.sample_rows)
        entries = []
        for i, s in enumerate(scheduled):
            req = s.request
            if req.status is RequestStatus.FINISHED or req not in num_drafts:
                continue
            c, kept = plan.num_computed[i], s.num_new_tokens - s.num_rejected_tokens
            sampled = i in sample_rows and num_drafts[req] > 0
            entries.append((kept != 1, req, c, kept, int(starts[i]), s.block_table.block_ids, sampled))
        if not any(e[-1] for e in entries):
            return None
        entries.sort(key=lambda e: e[0])
        step = StepPlan(token_ids=[t for e in entries for t in e[1].token_ids[e[2] + 1:e[2] + e[3] + 1]],
                        query_lens=[e[3] for e in entries], num_computed=[e[2] for e in entries],
                        block_tables=[e[5] for e in entries],
                        sample_rows=[i for i, e in enumerate(entries) if e[-1]])
        hidden_rows = [row for e in entries for row in range(e[4], e[4] + e[3])]
        return DraftPlan(step, hidden_rows), [e[1] for e in entries if e[-1]], {e[1]: e[5] for e in entries}

    @staticmethod
    def _chained_pass(reqs: list[Request], drafts: dict[Request, list[int]], tables: dict[Request, Any],
                      live: list[int], j: int) -> DraftPlan:
        """Draft j (j >= 2): one row per request, at the position after the last one the module saw, reading
        draft j-1 and the module's own output there (rows ``live`` of the pass before)."""
        step = StepPlan(token_ids=[drafts[r][-1] for r in reqs], query_lens=[1] * len(reqs),
                        num_computed=[r.num_computed_tokens + j - 2 for r in reqs],
                        block_tables=[tables[r] for r in reqs], sample_rows=list(range(len(reqs))))
        return DraftPlan(step, live, chained=True)

    def _sample_drafts(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], torch.Tensor | None]:
        """Each request's draft token from the module's logits: the argmax for greedy requests, else a draw
        from q, the request's own sampling distribution over the draft logits (returned [S, vocab])."""
        batch = sampling_batch_of(reqs, logits.device, self.eos_token_ids, None, with_history=False)
        if batch.all_greedy:
            return logits.argmax(dim=-1).tolist(), None
        q, _ = self.sampler.distribution(logits, batch)
        return self.sampler.draw(q, batch).tolist(), q
