"""SamplingParams: one request's sampling settings (OpenAI / vLLM semantics), validated once; and the
stop-condition check that output processing runs after each token."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

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
    # prefill/decode disaggregation: this request's KvTransferParams as JSON text (kvstore/disagg.py), as
    # vLLM's kv_transfer_params; None for a colocated request
    kv_transfer: str | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()

    @functools.cached_property
    def sampling_row(self) -> np.ndarray:
        """The sampler's per-row values (columns TEMPERATURE..LOGPROBS of ``sampling.py``) as a read-only
        float32 array, gathered once per request (numpy stacks arrays several times faster than tuples):
        greedy rows get temperature 1 and every filter off; LOGPROBS is -1 where no logprobs were asked for.
        (Not a field: ``asdict`` and equality ignore it.)"""
        g = self.greedy
        row = np.array((1.0 if g else self.temperature, float(g), 0.0 if g or self.top_k < 1 else float(self.top_k),
                        1.0 if g else self.top_p, 0.0 if g else self.min_p, self.repetition_penalty,
                        self.presence_penalty, self.frequency_penalty, float(self.min_tokens),
                        -1.0 if self.logprobs is None else float(self.logprobs)), dtype=np.float32)
        row.flags.writeable = False
        return row

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
        if self.kv_transfer is not None and not isinstance(self.kv_transfer, str):
            raise _fail("kv_transfer", self.kv_transfer, "None or a JSON text (see kvstore/disagg.py)")
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

    @property
    def needs_previous_outputs(self) -> bool:
        """Whether sampling reads the tokens sampled so far (penalties, a grammar): such a request's next
        step cannot be scheduled before the last one's outputs are processed (no async scheduling)."""
        return (self.structured_output is not None or self.repetition_penalty != 1.0
                or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


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
    return stop_reason(params, output_ids[-1] if output_ids else None, len(output_ids), text, eos_ids,
                       num_new_text_chars)


def stop_reason(params: SamplingParams, last_token: int | None, num_outputs: int, text: str,
                eos_ids: tuple[int, ...], num_new_text_chars: int) -> tuple[str | None, int | None]:
    """``check_stop`` given the last output token and the number of outputs, not the output list (the
    engine's hot path: it never copies a request's outputs)."""
    if last_token is not None and num_outputs >= params.min_tokens:
        if last_token in params.stop_token_ids or (not params.ignore_eos and last_token in eos_ids):
            return "stop", None
        if params.stop and num_new_text_chars > 0:
            starts = [text.find(s, max(0, len(text) - num_new_text_chars - len(s) + 1)) for s in params.stop]
            hits = [i for i in starts if i >= 0]
            if hits:
                return "stop", min(hits)  # earliest stop string: text[:i] excludes it
    if num_outputs >= params.max_tokens:
        return "length", None
    return None, None
