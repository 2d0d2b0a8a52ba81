"""Server bounds and admission control.

Every request passes ``check_request`` (shape bounds: prompt length, max_tokens, n, stop strings) and then
``Admission.admit`` (load bounds: queued requests and tokens in flight). Past a shape bound the answer is a
``LimitExceeded`` naming it (HTTP 400); past a load bound a ``Busy`` (HTTP 429), so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.errors import Busy, LimitExceeded


@dataclass(frozen=True)
class ServerLimits:
    max_queued_requests: int = 1024  # admitted and not yet producing tokens
    max_tokens_in_flight: int = 1 << 20  # sum over unfinished requests of prompt + max_tokens
    max_prompt_tokens: int = 0  # 0 = the model's context length
    max_tokens: int = 0  # the largest max_tokens a request may ask for; 0 = the model's context length
    max_n: int = 8  # choices per HTTP request
    max_frame_bytes: int = 1 << 20  # one RPC frame or one HTTP body
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    stream_buffer_frames: int = 1024  # per request: frames kept for resume / not yet taken by a slow reader
    resume_grace_s: float = 30.0  # how long a resumable request outlives its connection

    def __post_init__(self) -> None:
        for name in ("max_queued_requests", "max_tokens_in_flight", "max_n", "max_frame_bytes",
                     "stream_buffer_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerLimits.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens", "max_stop_strings", "max_stop_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerLimits.{name} must be >= 0, got {getattr(self, name)}")
        if self.resume_grace_s < 0:
            raise ValueError(f"ServerLimits.resume_grace_s must be >= 0, got {self.resume_grace_s}")


def check_request(limits: ServerLimits, num_prompt_tokens: int, params: SamplingParams, n: int,
                  max_model_len: int) -> None:
    """Raise LimitExceeded (the bound, the value, what is allowed) for a request past a shape bound."""
    max_prompt = limits.max_prompt_tokens or max_model_len
    max_tokens = limits.max_tokens or max_model_len
    if num_prompt_tokens > max_prompt:
        raise LimitExceeded(f"prompt has {num_prompt_tokens} tokens; the limit is {max_prompt}", "prompt")
    if params.max_tokens > max_tokens:
        raise LimitExceeded(f"max_tokens={params.max_tokens} exceeds the limit of {max_tokens}", "max_tokens")
    if not 1 <= n <= limits.max_n:
        raise LimitExceeded(f"n={n} is outside [1, {limits.max_n}]", "n")
    if len(params.stop) > limits.max_stop_strings:
        raise LimitExceeded(f"{len(params.stop)} stop strings; the limit is {limits.max_stop_strings}", "stop")
    if any(len(s) > limits.max_stop_chars for s in params.stop):
        raise LimitExceeded(f"a stop string is longer than {limits.max_stop_chars} characters", "stop")
    if len(params.stop_token_ids) > limits.max_stop_strings:
        raise LimitExceeded(f"{len(params.stop_token_ids)} stop token ids; the limit is "
                            f"{limits.max_stop_strings}", "stop_token_ids")


class Ticket:
    """One admitted request (or the n choices of one HTTP request): release it exactly once."""

    def __init__(self, admission: Admission, count: int, tokens: int):
        self._admission = admission
        self.count, self.tokens = count, tokens
        self._queued = count
        self._released = False

    def started(self, count: int = 1) -> None:
        """``count`` of the ticket's requests produced their first token (no longer queued)."""
        count = min(count, self._queued)
        self._queued -= count
        self._admission.num_queued -= count

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission.num_queued -= self._queued
        self._queued = 0
        self._admission.num_in_flight -= self.count
        self._admission.tokens_in_flight -= self.tokens


class Admission:
    """Counts what the front end has accepted; ``admit`` refuses with Busy past a bound. Single-threaded
    (the event loop's)."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.num_queued = 0
        self.num_in_flight = 0
        self.tokens_in_flight = 0

    def admit(self, count: int, tokens: int) -> Ticket:
        lim = self.limits
        if self.num_queued + count > lim.max_queued_requests:
            raise Busy(f"server busy: {self.num_queued} requests queued (limit {lim.max_queued_requests}); "
                       "retry later")
        if self.tokens_in_flight + tokens > lim.max_tokens_in_flight:
            raise Busy(f"server busy: {self.tokens_in_flight} tokens in flight (limit "
                       f"{lim.max_tokens_in_flight}); retry later")
        self.num_queued += count
        self.num_in_flight += count
        self.tokens_in_flight += tokens
        return Ticket(self, count, tokens)
