"""The batched sampler.

Order of operations in :meth:`Sampler.sample` (per row, all batched):
grammar mask (structured output: tokens the request's grammar does not allow get -inf) -> penalties
(repetition over prompt+output, presence/frequency over output) -> min_tokens blocking of stop/eos ids ->
greedy rows take argmax here -> temperature -> top-k -> top-p -> min-p -> draw (one uniform per row, inverse
CDF; only the best candidates when top-k / top-p is asked: sampling_draw.py).

``SamplingParams`` and ``check_stop`` live in ``sampling_params.py``, the per-step ``SamplingBatch`` in
``sampling_batch.py``; all are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.coordinator.sampling_batch import (
    GREEDY,
    MIN_P,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    SamplingBatch,
    make_sampling_batch,
)
from moeserve.coordinator.sampling_draw import (
    draw_candidates,
    draw_full,
    first_candidates,
    inverse_cdf,
    shifted_exp,
    uniforms,
)
from moeserve.coordinator.sampling_params import (
    GREEDY_EPS,
    MAX_LOGPROBS,
    SamplingParams,
    SamplingParamsError,
    check_stop,
)
from moeserve.coordinator.structured import unpack_bitmask

__all__ = ["GREEDY_EPS", "MAX_LOGPROBS", "Sampler", "SamplerOutput", "SamplingBatch", "SamplingParams",
           "SamplingParamsError", "check_stop", "make_sampling_batch"]


@dataclass(frozen=True)
class SamplerOutput:
    """token_ids [B] long; logprobs [B] float32 of the sampled token (see Sampler.sample);
    top_logprobs (values [B, N] float32, ids [B, N] long) of the RAW model distribution, or None."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None


def _counts(padded: tuple[torch.Tensor, torch.Tensor], vocab: int) -> torch.Tensor:
    """Occurrence counts [B, vocab] float32 via scatter_add; ids >= vocab are ignored."""
    ids, mask = padded
    keep = mask & (ids < vocab)
    out = torch.zeros(ids.shape[0], vocab, dtype=torch.float32, device=ids.device)
    return out.scatter_add_(1, ids.clamp(max=vocab - 1), keep.to(torch.float32))


class Sampler:
    """Batched sampler; randomness comes from the default generator or per-request generators. Its only
    state is a scratch buffer reused from step to step."""

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row from ``logits`` [B, vocab] float32 (not modified, except that the rows
        of a ``token_bitmask`` get their grammar's -inf in place).

        ``logprobs`` [B]: log-prob of the chosen token under log_softmax(penalised logits / temperature),
        i.e. after penalties and temperature but before the top-k/top-p/min-p truncation (greedy rows:
        log_softmax of the penalised logits). ``top_logprobs``: top-N of log_softmax(raw logits), before
        any penalty or temperature (vLLM's default "raw_logprobs").
        """
        if logits.dim() != 2 or logits.shape[0] != batch.size:
            raise ValueError(f"logits must be [{batch.size}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()
        top: tuple[torch.Tensor, torch.Tensor] | None = None
        if batch.num_top_logprobs > 0:
            n = min(batch.num_top_logprobs, logits.shape[1])
            values, top_ids = logits.topk(n, dim=-1)  # no [B, vocab] log_softmax: shift the N values only
            top = (values - torch.logsumexp(logits, dim=-1, keepdim=True), top_ids)
        logits = self._prepare(logits, batch)
        if batch.all_greedy:  # fast path: argmax only
            best, ids = logits.max(dim=-1)
            return SamplerOutput(ids, chosen_logprobs(logits, best, batch, self._work), top)
        ids, logprobs = self._sample_rows(logits, batch)
        return SamplerOutput(ids, logprobs, top)

    def _work(self, logits: torch.Tensor) -> torch.Tensor:
        """A [R, V] float32 scratch like ``logits``, from one grow-only buffer (see sampling_draw.shifted_exp)."""
        buf = self._scratch
        if buf is None or buf.numel() < logits.numel() or buf.device != logits.device:
            buf = self._scratch = torch.empty(logits.numel(), dtype=torch.float32, device=logits.device)
        return buf[:logits.numel()].view(logits.shape)

    def _sample_rows(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B] and log-probs [B] of a batch with sampled rows. The rows go in up to three groups,
        each batched: greedy (one argmax), sampled without top-k / top-p (inverse CDF over the vocabulary),
        sampled with them (inverse CDF over the best candidates); see sampling_draw.py."""
        host = batch.host_rows.numpy()
        sampled, filtered = host[GREEDY] == 0, (host[TOP_K] > 0) | (host[TOP_P] < 1.0)
        u = uniforms(batch.size, batch.seeded, logits.device)
        ids = torch.empty(batch.size, dtype=torch.long, device=logits.device)
        logprobs = torch.empty(batch.size, dtype=torch.float32, device=logits.device)
        for kind, mask in (("greedy", ~sampled), ("full", sampled & ~filtered), ("candidates", sampled & filtered)):
            rows = np.flatnonzero(mask)
            if not rows.size:
                continue
            group = _RowGroup(logits, batch, u, rows)
            out = group.greedy(self._work) if kind == "greedy" else \
                group.sample(kind == "candidates", self._work(group.logits))
            if group.index is None:  # one group holds every row
                return out
            ids.index_copy_(0, group.index, out[0])
            logprobs.index_copy_(0, group.index, out[1])
        return ids, logprobs

    def _prepare(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The grammar mask and the penalties."""
        if batch.token_bitmask is not None:
            logits = self._apply_bitmask(logits, *batch.token_bitmask)
        if batch.need_penalties:
            logits = self._apply_penalties(logits, batch)
        return logits

    def distribution(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``sample`` draws from, for speculative decoding: (probs [B, vocab] float32 -- one-hot at the
        argmax on greedy rows --, logp [B, vocab]: the log-probs whose entry at a drawn token is the
        ``logprobs`` that ``sample`` reports)."""
        logits = self._prepare(logits.float(), batch)
        onehot = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[1]).float()
        if batch.all_greedy:
            return onehot, torch.log_softmax(logits, dim=-1)
        scaled = logits / batch.temperature[:, None]
        probs = torch.softmax(self._apply_filters(scaled, batch), dim=-1)
        return torch.where(batch.greedy[:, None], onehot, probs), torch.log_softmax(scaled, dim=-1)

    @staticmethod
    def draw(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """One token per row of ``probs`` [B, vocab] (seeded rows from their generators): the inverse CDF at one
        uniform per row, as ``sample`` draws."""
        return inverse_cdf(probs.float(), uniforms(batch.size, batch.seeded, probs.device))

    @staticmethod
    def _apply_filters(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Top-k, then top-p (mass strictly before a token < p; the best token always stays), then min-p, over
        the whole vocabulary with one sort: the rule ``sampling_draw._kept`` applies to the best candidates,
        here for the distributions speculative decoding compares (off rows: top-k 0, top-p 1, min-p 0)."""
        vocab = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where(batch.top_k > 0, batch.top_k, vocab).clamp(max=vocab)
        remove = torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= (before >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1.0)
        remove[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter_(1, order, remove), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p[:, None]
        return logits.masked_fill(probs < threshold, float("-inf"))

    @staticmethod
    def _apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """-inf where a constrained row's grammar forbids the token, in place: only those rows are read and
        written, so unconstrained rows cost nothing and the batch is not copied."""
        with torch.inference_mode():  # the engine's logits are inference tensors: in place only in this mode
            allowed = unpack_bitmask(bitmask, logits.shape[1])  # [R, vocab] bool
            if rows.numel() == logits.shape[0]:  # every row constrained (rows are ascending): no gather
                return logits.masked_fill_(~allowed, float("-inf"))
            ninf = torch.full((), float("-inf"), device=logits.device)
            return logits.index_put_((rows,), torch.where(allowed, logits[rows], ninf))

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Repetition (HF/vLLM, prompt+output), presence/frequency (OpenAI, output only), min_tokens block."""
        vocab = logits.shape[1]
        counts = _counts(batch.output_ids, vocab) if batch.output_ids is not None else None
        if batch.need_repetition and counts is not None and batch.prompt_ids is not None:
            seen = (counts > 0) | (_counts(batch.prompt_ids, vocab) > 0)
            p = batch.repetition_penalty[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
        if batch.need_presence_frequency and counts is not None:
            logits = logits - batch.frequency_penalty[:, None] * counts
            logits = logits - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
        if batch.blocked_ids is not None:
            logits = logits.masked_fill(_counts(batch.blocked_ids, vocab) > 0, float("-inf"))
        return logits


def chosen_logprobs(logits: torch.Tensor, best: torch.Tensor, batch: SamplingBatch,
                    scratch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The greedy rows' chosen-token log-probs (``best``: their largest logits), -log(sum(exp(logits - best))):
    one pass over the vocabulary in ``scratch(logits)``'s reused buffer, paid only where a row of the batch asked
    for logprobs; NaN otherwise."""
    if batch.need_logprobs:
        return shifted_exp(logits, best[:, None], None, scratch(logits)).sum(-1).log_().neg_()
    return torch.full_like(best, float("nan"))


class _RowGroup:
    """Some rows of a step's batch (``rows``, ascending host indices) and the per-row values they read."""

    def __init__(self, logits: torch.Tensor, batch: SamplingBatch, u: torch.Tensor, rows: np.ndarray) -> None:
        self.batch, self.rows, self.host = batch, rows, batch.host_rows.numpy()[:, rows]
        self.index = None if rows.size == batch.size else torch.from_numpy(rows).to(logits.device)
        self.logits, self.u = self.take(logits), self.take(u)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.index is None else t.index_select(0, self.index)

    def greedy(self, scratch: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        best, ids = self.logits.max(dim=-1)
        return ids, chosen_logprobs(self.logits, best, self.batch, scratch)

    def sample(self, with_candidates: bool, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        host, batch, logits = self.host, self.batch, self.logits
        temperature = self.take(batch.temperature) if (host[TEMPERATURE] != 1.0).any() else None
        min_p = self.take(batch.min_p) if (host[MIN_P] > 0).any() else None
        if not with_candidates:
            return draw_full(logits, temperature, min_p, self.u, work)
        top_p = self.take(batch.top_p) if (host[TOP_P] < 1.0).any() else None
        candidates = first_candidates(host[TOP_K].astype(np.int64).tolist(), logits.shape[1],
                                      logits.device.type == "cpu")
        return draw_candidates(logits, temperature, self.take(batch.top_k), top_p, min_p, self.u, candidates, work)
