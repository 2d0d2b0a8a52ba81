"""The batched sampler and the per-step batch it reads.

Order of operations in :meth:`Sampler.sample` (per row, all batched):
grammar mask (structured output: tokens the request's grammar does not allow get -inf) -> penalties
(repetition over prompt+output, presence/frequency over output) -> min_tokens blocking of stop/eos ids ->
greedy rows take argmax here -> temperature -> top-k -> top-p -> min-p -> draw (one uniform per row, inverse
CDF; only the best candidates when top-k / top-p is asked: sampling_draw.py).

``SamplingParams`` and ``check_stop`` live in ``sampling_params.py`` and are importable from here too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from moeserve.coordinator.sampling_draw import (
    draw_candidates,
    draw_full,
    first_candidates,
    inverse_cdf,
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
from moeserve.device_copy import to_device

__all__ = ["GREEDY_EPS", "MAX_LOGPROBS", "Sampler", "SamplerOutput", "SamplingBatch", "SamplingParams",
           "SamplingParamsError", "check_stop", "make_sampling_batch"]


# the columns of a row of per-request sampling values (``SamplingParams.sampling_row``)
TEMPERATURE, GREEDY, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY, MIN_TOKENS, LOGPROBS = range(10)
NUM_COLUMNS = 10


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling state for B rows; built by :func:`make_sampling_batch`, all tensors on one device.

    Padded id tensors are [B, L] long (pad 0) with a [B, L] bool mask; None when no row needs them.
    Greedy rows hold temperature 1 and filters off so batched maths on them is harmless. The per-row
    values travel to the device in one copy, and only when a sampling path reads them (``rows``).
    """

    size: int
    host_rows: torch.Tensor  # [NUM_COLUMNS, B] float32 on the host (columns named above)
    device: torch.device
    output_ids: tuple[torch.Tensor, torch.Tensor] | None  # (ids, mask) [B, L]
    prompt_ids: tuple[torch.Tensor, torch.Tensor] | None  # (ids, mask) [B, Lp]; only for repetition
    blocked_ids: tuple[torch.Tensor, torch.Tensor] | None  # (ids, mask) [B, S]; stop/eos ids under min_tokens
    seeded: tuple[tuple[int, torch.Generator], ...]  # (row, generator) of non-greedy seeded rows
    all_greedy: bool
    need_repetition: bool
    need_presence_frequency: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    num_top_logprobs: int  # N = max requested logprobs; 0 = no top logprobs
    # structured output: (rows [R] long, packed allowed-token bitmask [R, ceil(vocab/32)] int32), or None
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """[NUM_COLUMNS, B] float32 on the device."""
        return to_device(self.host_rows, self.device)

    @property
    def temperature(self) -> torch.Tensor:  # [B] float32
        return self.rows[TEMPERATURE]

    @property
    def greedy(self) -> torch.Tensor:  # [B] bool
        return self.rows[GREEDY] > 0

    @property
    def top_k(self) -> torch.Tensor:  # [B] long, 0 = off
        return self.rows[TOP_K].long()

    @property
    def top_p(self) -> torch.Tensor:  # [B] float32
        return self.rows[TOP_P]

    @property
    def min_p(self) -> torch.Tensor:  # [B] float32
        return self.rows[MIN_P]

    @property
    def repetition_penalty(self) -> torch.Tensor:  # [B] float32
        return self.rows[REPETITION]

    @property
    def presence_penalty(self) -> torch.Tensor:  # [B] float32
        return self.rows[PRESENCE]

    @property
    def frequency_penalty(self) -> torch.Tensor:  # [B] float32
        return self.rows[FREQUENCY]

    @property
    def need_penalties(self) -> bool:
        return self.need_repetition or self.need_presence_frequency or self.blocked_ids is not None


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged id lists into (ids [B, L] long, mask [B, L] bool) without a per-token Python loop."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    ids[mask] = flat
    return to_device(ids, device), to_device(mask, device)


def _blocked(params: Sequence[SamplingParams], num_outputs: np.ndarray, min_tokens: np.ndarray,
             eos_token_ids: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    """Per row, the ids blocked while it has fewer than min_tokens outputs (None when no row has any)."""
    rows = np.flatnonzero(num_outputs < min_tokens)
    if not rows.size:
        return None
    blocked: list[tuple[int, ...]] = [()] * len(params)
    for i in rows.tolist():
        p = params[i]
        blocked[i] = p.stop_token_ids + (() if p.ignore_eos else eos_token_ids)
    return blocked if any(blocked) else None


def make_sampling_batch(
    params: list[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]],
    generators: list[torch.Generator | None],
    device: torch.device | str,
    eos_token_ids: tuple[int, ...] = (),
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_output_tokens: Sequence[int] | None = None,
) -> SamplingBatch:
    """Pure: per-row tensors and flags for one step. All lists have length B, row i = request i.

    ``eos_token_ids`` (optional) are blocked, with ``stop_token_ids``, while a row has fewer than
    ``min_tokens`` outputs (eos only unless ``ignore_eos``). Generators may live on any device.
    ``token_bitmask`` (rows, packed bitmask) from ``StructuredOutput.bitmask`` is moved to ``device``.
    ``num_output_tokens``: how many outputs each row has before this one (default: the lengths of
    ``output_token_ids``, which are then read only for the penalties: the engine passes empty lists when no
    row has one). Per-row values are gathered once into a numpy array; no tensor is made per row.
    """
    if not (len(output_token_ids) == len(prompt_token_ids) == len(generators) == len(params)):
        raise ValueError("params, output_token_ids, prompt_token_ids and generators must have equal lengths")
    device = torch.device(device)
    rows = np.array([p.sampling_row for p in params], dtype=np.float32).reshape(len(params), NUM_COLUMNS)
    sampled = rows[:, GREEDY] == 0
    need_rep = bool((rows[:, REPETITION] != 1.0).any())
    pres_freq = bool(((rows[:, PRESENCE] != 0.0) | (rows[:, FREQUENCY] != 0.0)).any())
    num_outputs = np.fromiter(map(len, output_token_ids), np.int64, len(params)) if num_output_tokens is None \
        else np.asarray(num_output_tokens, dtype=np.int64)
    blocked = _blocked(params, num_outputs, rows[:, MIN_TOKENS], eos_token_ids)
    return SamplingBatch(
        size=len(params),
        host_rows=torch.from_numpy(np.ascontiguousarray(rows.T)),
        device=device,
        output_ids=_pad(output_token_ids, device) if (need_rep or pres_freq) else None,
        prompt_ids=_pad(prompt_token_ids, device) if need_rep else None,
        blocked_ids=_pad(blocked, device) if blocked is not None else None,
        seeded=tuple((i, g) for i, g in enumerate(generators) if g is not None and sampled[i]),
        all_greedy=not sampled.any(),
        need_repetition=need_rep,
        need_presence_frequency=pres_freq,
        need_top_k=bool((rows[sampled, TOP_K] > 0).any()),
        need_top_p=bool((rows[sampled, TOP_P] < 1.0).any()),
        need_min_p=bool((rows[sampled, MIN_P] > 0.0).any()),
        num_top_logprobs=int(rows[:, LOGPROBS].max(initial=0)),
        token_bitmask=None if token_bitmask is None else (to_device(token_bitmask[0], device),
                                                          to_device(token_bitmask[1], device)),
    )


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
            return SamplerOutput(ids, best - torch.logsumexp(logits, dim=-1), top)
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
            out = group.greedy() if kind == "greedy" else \
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


class _RowGroup:
    """Some rows of a step's batch (``rows``, ascending host indices) and the per-row values they read."""

    def __init__(self, logits: torch.Tensor, batch: SamplingBatch, u: torch.Tensor, rows: np.ndarray) -> None:
        self.batch, self.rows, self.host = batch, rows, batch.host_rows.numpy()[:, rows]
        self.index = None if rows.size == batch.size else torch.from_numpy(rows).to(logits.device)
        self.logits, self.u = self.take(logits), self.take(u)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.index is None else t.index_select(0, self.index)

    def greedy(self) -> tuple[torch.Tensor, torch.Tensor]:
        best, ids = self.logits.max(dim=-1)
        return ids, best - torch.logsumexp(self.logits, dim=-1)

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
