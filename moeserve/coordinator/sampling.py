"""Sampling parameters, the batched sampler and the stop-condition check.

Order of operations in :meth:`Sampler.sample` (per row, all batched):
grammar mask (structured output: tokens the request's grammar does not allow get -inf) -> penalties (repetition over prompt+output, presence/frequency over output) -> min_tokens blocking of stop/eos
ids -> greedy rows take argmax here -> temperature -> top-k -> top-p -> min-p -> draw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import chain
from typing import Any

import torch

from moeserve.coordinator.structured import unpack_bitmask

GREEDY_EPS = 1e-5  # a temperature below this is greedy
MAX_LOGPROBS = 20
_INT_FIELDS = ("max_tokens", "top_k", "min_tokens")
_OPT_INT_FIELDS = ("seed", "logprobs")
_FLOAT_FIELDS = (
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"
)


class SamplingParamsError(ValueError):
    """Invalid sampling parameters; the message names the field and what it allows. ``field``, ``value`` and
    ``allowed`` let a front end say the same in its own request's names (``describe``)."""

    def __init__(self, message: str, field: str | None = None, value: Any = None, allowed: str | None = None):
        super().__init__(message)
        self.field, self.value, self.allowed = field, value, allowed

    def describe(self, param: str) -> str:
        """The error in one line, naming ``param`` (the request's name for ``field``)."""
        if self.allowed is None:
            return f"unknown field {param!r}" if self.field is not None else str(self)
        try:
            shown = json.dumps(self.value)  # a request's values are JSON (or msgpack) values
        except (TypeError, ValueError):
            shown = repr(self.value)
        return f"field {param!r}: must be {self.allowed}, got {shown}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(name: str, value: Any, allowed: str) -> SamplingParamsError:
    message = f"SamplingParams.{name}={value!r} is invalid: must be {allowed}"
    return SamplingParamsError(message, name, value, allowed)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI/vLLM semantics); validated on construction.

    ``temperature`` below 1e-5 means greedy. ``top_k`` -1 or 0 is off. ``stop`` also accepts one string or a
    list (normalised to a tuple). ``logprobs``: None = no top logprobs, N in 0..20 = top-N of the raw model
    distribution (0 = only the sampled token's logprob, which is always returned).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    structured_output: str | None = None  # a grammar spec as JSON text (coordinator/structured.py)

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()

    def _check_types(self) -> None:
        for name in _INT_FIELDS + _OPT_INT_FIELDS:
            v = getattr(self, name)
            if not _is_int(v) and not (v is None and name in _OPT_INT_FIELDS):
                raise _fail(name, v, "an integer" + (" or None" if name in _OPT_INT_FIELDS else ""))
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
                raise _fail(name, v, "a finite number")
            object.__setattr__(self, name, float(v))
        if self.structured_output is not None and not isinstance(self.structured_output, str):
            raise _fail("structured_output", self.structured_output, "None or a JSON text (see structured.py)")
        if not isinstance(self.ignore_eos, bool):
            raise _fail("ignore_eos", self.ignore_eos, "a bool")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise _fail("stop", self.stop, "a non-empty string or a list of non-empty strings")
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise _fail("stop_token_ids", ids, "a list of integers >= 0")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    def _check_ranges(self) -> None:
        checks: tuple[tuple[str, bool, str], ...] = (
            ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0.0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k >= -1, "-1 or 0 (off) or an integer >= 1"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "> 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64, "an integer in [0, 2**64)"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"in [0, {MAX_LOGPROBS}]"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "in [0, max_tokens]"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise _fail(name, getattr(self, name), allowed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict (JSON/msgpack); unknown keys and wrong types raise SamplingParamsError.

        Lists become tuples for ``stop``/``stop_token_ids``; a single string ``stop`` is one stop string.
        None is accepted only for ``seed`` and ``logprobs``.
        """
        if not isinstance(d, dict):
            raise SamplingParamsError(f"SamplingParams must be built from a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)}, key=str)
        if unknown:
            raise SamplingParamsError(f"unknown SamplingParams field(s): {', '.join(map(str, unknown))}",
                                      str(unknown[0]))
        return cls(**d)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling state for B rows; built by :func:`make_sampling_batch`, all tensors on one device.

    Padded id tensors are [B, L] long (pad 0) with a [B, L] bool mask; None when no row needs them.
    Greedy rows hold temperature 1 and filters off so batched maths on them is harmless.
    """

    size: int
    temperature: torch.Tensor  # [B] float32
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
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

    @property
    def need_penalties(self) -> bool:
        return self.need_repetition or self.need_presence_frequency or self.blocked_ids is not None


def _pad(rows: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged id lists into (ids [B, L] long, mask [B, L] bool) without a per-token Python loop."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    ids[mask] = flat
    return ids.to(device), mask.to(device)


def _row_tensors(params: Sequence[SamplingParams], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Per-row [B] tensors; greedy rows get temperature 1 and every filter off."""
    g = [p.greedy for p in params]

    def col(values: Sequence[float | bool | int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return {
        "temperature": col([1.0 if gr else p.temperature for p, gr in zip(params, g)]),
        "greedy": col(g, torch.bool),
        "top_k": col([0 if gr or p.top_k < 1 else p.top_k for p, gr in zip(params, g)], torch.long),
        "top_p": col([1.0 if gr else p.top_p for p, gr in zip(params, g)]),
        "min_p": col([0.0 if gr else p.min_p for p, gr in zip(params, g)]),
        "repetition_penalty": col([p.repetition_penalty for p in params]),
        "presence_penalty": col([p.presence_penalty for p in params]),
        "frequency_penalty": col([p.frequency_penalty for p in params]),
    }


def make_sampling_batch(
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    prompt_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
    device: torch.device | str,
    eos_token_ids: tuple[int, ...] = (),
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SamplingBatch:
    """Pure: per-row tensors and flags for one step. All lists have length B, row i = request i.

    ``eos_token_ids`` (optional) are blocked, with ``stop_token_ids``, while a row has fewer than
    ``min_tokens`` outputs (eos only unless ``ignore_eos``). Generators may live on any device.
    ``token_bitmask`` (rows, packed bitmask) from ``StructuredOutput.bitmask`` is moved to ``device``.
    """
    if not (len(output_token_ids) == len(prompt_token_ids) == len(generators) == len(params)):
        raise ValueError("params, output_token_ids, prompt_token_ids and generators must have equal lengths")
    sampled = [p for p in params if not p.greedy]
    need_rep = any(p.repetition_penalty != 1.0 for p in params)
    pres_freq = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    blocked = [
        (p.stop_token_ids + (() if p.ignore_eos else eos_token_ids)) if len(o) < p.min_tokens else ()
        for p, o in zip(params, output_token_ids)
    ]
    return SamplingBatch(
        size=len(params),
        **_row_tensors(params, device),
        output_ids=_pad(output_token_ids, device) if (need_rep or pres_freq) else None,
        prompt_ids=_pad(prompt_token_ids, device) if need_rep else None,
        blocked_ids=_pad(blocked, device) if any(blocked) else None,
        seeded=tuple((i, g) for i, g in enumerate(generators) if g is not None and not params[i].greedy),
        all_greedy=not sampled,
        need_repetition=need_rep,
        need_presence_frequency=pres_freq,
        need_top_k=any(p.top_k > 0 for p in sampled),
        need_top_p=any(p.top_p < 1.0 for p in sampled),
        need_min_p=any(p.min_p > 0.0 for p in sampled),
        num_top_logprobs=max((p.logprobs or 0 for p in params), default=0),
        token_bitmask=None if token_bitmask is None else (token_bitmask[0].to(device),
                                                          token_bitmask[1].to(device, non_blocking=True)),
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
    """Stateless batched sampler; randomness comes from the default generator or per-request generators."""

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
            top = tuple(torch.log_softmax(logits, dim=-1).topk(n, dim=-1))  # type: ignore[assignment]
        if batch.token_bitmask is not None:
            logits = self._apply_bitmask(logits, *batch.token_bitmask)
        if batch.need_penalties:
            logits = self._apply_penalties(logits, batch)
        if batch.all_greedy:  # fast path: argmax only
            best, ids = logits.max(dim=-1)
            return SamplerOutput(ids, best - torch.logsumexp(logits, dim=-1), top)
        scaled = logits / batch.temperature[:, None]
        logp = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(self._apply_filters(scaled, batch), dim=-1)
        ids = torch.where(batch.greedy, logits.argmax(dim=-1), self._draw(probs, batch))
        return SamplerOutput(ids, logp.gather(1, ids[:, None]).squeeze(1), top)

    @staticmethod
    def _apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """-inf where a constrained row's grammar forbids the token, in place: only those rows are read and
        written, so unconstrained rows cost nothing and the batch is not copied."""
        with torch.inference_mode():  # the engine's logits are inference tensors: in place only in this mode
            allowed = unpack_bitmask(bitmask, logits.shape[1])  # [R, vocab] bool
            if rows.numel() == logits.shape[0]:  # every row constrained (rows are ascending): no gather
                return logits.masked_fill_(~allowed, float("-inf"))
            ninf = torch.tensor(float("-inf"), device=logits.device)
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

    @staticmethod
    def _apply_filters(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Top-k, then top-p (mass strictly before a token < p; the best token always stays), then min-p."""
        vocab = logits.shape[1]
        if batch.need_top_k or batch.need_top_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if batch.need_top_k:
                k = torch.where(batch.top_k > 0, batch.top_k, vocab).clamp(max=vocab)
                remove |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
            if batch.need_top_p:
                sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
                before = sorted_probs.cumsum(dim=-1) - sorted_probs
                remove |= (before >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1.0)
            remove[:, 0] = False
            logits = logits.masked_fill(torch.zeros_like(remove).scatter_(1, order, remove), float("-inf"))
        if batch.need_min_p:
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        return logits

    @staticmethod
    def _draw(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Exponential race argmax(probs / E), E ~ Exp(1): seeded rows draw E from their own generator."""
        noise = torch.empty_like(probs)
        if len(batch.seeded) < batch.size:
            noise.exponential_()
        for row, gen in batch.seeded:  # loop over seeded requests only
            e = torch.empty(probs.shape[1], dtype=torch.float32, device=gen.device)
            e.exponential_(generator=gen)
            noise[row] = e.to(probs.device)
        noise.clamp_min_(torch.finfo(torch.float32).tiny)  # E == 0 would make 0/0 = NaN win the argmax
        return (probs / noise).argmax(dim=-1)


def check_stop(
    params: SamplingParams,
    output_ids: list[int],
    text: str,
    eos_ids: tuple[int, ...],
    num_new_text_chars: int,
) -> tuple[str | None, int | None]:
    """Return (finish_reason, truncate_text_at) after a token was appended.

    Stop conditions are checked first, and only once len(output_ids) >= min_tokens: the last token in
    ``stop_token_ids`` or in ``eos_ids`` (unless ignore_eos) -> ("stop", None); a stop string ending within
    the last ``num_new_text_chars`` chars of ``text`` (only that tail, plus len(stop) - 1 chars, is
    searched) -> ("stop", i) where text[:i] is the output without the stop string (earliest match wins).
    Then len(output_ids) >= max_tokens -> ("length", None). Otherwise (None, None).
    """
    if output_ids and len(output_ids) >= params.min_tokens:
        last = output_ids[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
            return "stop", None
        starts = [text.find(s, max(0, len(text) - num_new_text_chars - len(s) + 1)) for s in params.stop]
        hits = [i for i in starts if i >= 0 and num_new_text_chars > 0]
        if hits:
            return "stop", min(hits)  # earliest stop string: text[:i] excludes it
    if len(output_ids) >= params.max_tokens:
        return "length", None
    return None, None
