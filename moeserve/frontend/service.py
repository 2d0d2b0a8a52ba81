"""GenerationService: what the RPC and HTTP front ends share -- tokenizing, bounds, admission, replica
routing, streaming events, metrics and the audit log. Runs on the server's event loop.

A request's life: ``prepare`` (validate into a ``GenerateRequest``) -> ``admit`` (a ``Ticket``, or Busy) ->
``generate`` (route to a replica, stream ``TokenEvent``s, then one ``FinalEvent``) -> the caller releases the
ticket. Leaving ``generate`` early (cancelled, client gone) aborts the request in its engine at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from moeserve.coordinator.async_engine import EngineLoopError
from moeserve.coordinator.engine_driver import EngineSnapshot, EngineUpdate
from moeserve.coordinator.request import RequestError
from moeserve.coordinator.sampling import SamplingParams, SamplingParamsError
from moeserve.coordinator.structured import StructuredOutputError, compile_spec
from moeserve.coordinator.supervisor import StreamInterrupted
from moeserve.frontend.auth import AuditLog, prompt_hash
from moeserve.frontend.errors import BadRequest, EngineFailure, EngineRankFailure, FrontendError, Unavailable
from moeserve.frontend.limits import Admission, ServerLimits, Ticket, check_request
from moeserve.frontend.metrics import ServerMetrics
from moeserve.frontend.router import PrefixIndex, choose_replica
from moeserve.kvstore.prefix import block_hashes
from moeserve.model.tokenizer import Tokenizer


class Backend(Protocol):
    """One replica: ``AsyncEngine`` in this process, or ``ReplicaBackend`` for a replica process."""

    snapshot: EngineSnapshot

    def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               trace_experts: bool = False) -> AsyncIterator[EngineUpdate]: ...


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    capacity_tokens: int  # the whole latent cache of one replica


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    trace_experts: bool = False
    key_id: str | None = None
    protocol: str = "rpc"


@dataclass
class TokenEvent:
    token_ids: list[int]
    text_delta: str
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    expert_ids: list[list[list[int]]] | None
    time: float


@dataclass
class Timings:
    queue_s: float | None = None  # engine arrival -> first scheduled
    ttft_s: float | None = None  # front-end arrival -> first token
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # between consecutive tokens

    def as_dict(self) -> dict[str, Any]:
        return {"queue_s": self.queue_s, "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "itl_s": self.itl_s}


@dataclass
class FinalEvent:
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    text: str
    token_ids: list[int]
    timings: Timings
    num_draft_tokens: int = 0  # speculative decoding: drafts verified for the request, and accepted
    num_accepted_draft_tokens: int = 0


def check_structured_output(spec: str, has_tokenizer: bool) -> None:
    """A grammar spec that cannot be compiled is a bad request, with the library's reason."""
    if not has_tokenizer:
        raise BadRequest("structured output needs a tokenizer", "structured_output")
    try:
        compile_spec(spec)
    except StructuredOutputError as e:
        raise BadRequest(f"structured_output: {e}", "structured_output") from None


def sampling_params(fields: dict[str, Any], names: Mapping[str, str] | None = None,
                    prefix: str = "") -> SamplingParams:
    """``fields`` as SamplingParams, or a BadRequest naming the request's field at fault: ``prefix`` + its
    name in ``names`` (where the request calls a SamplingParams field otherwise), else the field's own."""
    try:
        return SamplingParams.from_dict(fields)
    except SamplingParamsError as e:
        if e.field is None:
            raise BadRequest(str(e), prefix.rstrip(".") or None) from None
        param = prefix + (names or {}).get(e.field, e.field)
        raise BadRequest(e.describe(param), param) from None
    except Exception as e:  # noqa: BLE001 - anything else a strange dict can raise is still a bad request
        raise BadRequest(f"invalid sampling parameters: {type(e).__name__}",
                         prefix.rstrip(".") or None) from None


class GenerationService:
    def __init__(self, tokenizer: Tokenizer | None, model: ModelInfo, limits: ServerLimits,
                 metrics: ServerMetrics, audit: AuditLog | None = None, routing: str = "affinity"):
        self.tokenizer = tokenizer
        self.model = model
        self.limits = limits
        self.metrics = metrics
        self.audit = audit or AuditLog(None)
        self.admission = Admission(limits)
        self.routing = routing
        self.backends: list[Backend] = []
        self.state = "loading"  # loading -> ready -> draining; or failed (the engine loop failed)
        self.failure: str | None = None  # why, once failed
        self._indexes: list[PrefixIndex] = []
        self._loads: list[int] = []
        self._routed = 0

    def attach(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        blocks = max(1, self.model.capacity_tokens // self.model.block_size)
        self._indexes = [PrefixIndex(blocks) for _ in self.backends]
        self._loads = [0] * len(self.backends)

    def snapshots(self) -> list[EngineSnapshot]:
        return [b.snapshot for b in self.backends]

    # ---- before a request runs ----
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this server has no tokenizer: send token ids", "prompt")
        return self.tokenizer.encode(prompt)

    def prepare(self, request_id: str, token_ids: list[int], params: SamplingParams, n: int = 1,
                trace_experts: bool = False, key_id: str | None = None, protocol: str = "rpc") -> GenerateRequest:
        """Validate against the server bounds and the model; raises LimitExceeded / BadRequest."""
        check_request(self.limits, len(token_ids), params, n, self.model.max_model_len)
        m = self.model
        if not token_ids:
            raise BadRequest("the prompt is empty", "prompt")
        bad = next((t for t in token_ids if not 0 <= t < m.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary [0, {m.vocab_size})", "prompt")
        total = len(token_ids) + params.max_tokens
        if total > min(m.max_model_len, m.capacity_tokens):
            raise BadRequest(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds the context length {min(m.max_model_len, m.capacity_tokens)}", "max_tokens")
        if params.stop and self.tokenizer is None:
            raise BadRequest("stop strings need a tokenizer", "stop")
        if params.structured_output is not None:
            check_structured_output(params.structured_output, self.tokenizer is not None)
        return GenerateRequest(request_id, token_ids, params, trace_experts, key_id, protocol)

    @property
    def health(self) -> str:
        """/health's status: the service's state, or "recovering" while a replica restarts its ranks."""
        if self.state == "ready" and any(s.recovering for s in self.snapshots()):
            return "recovering"
        return self.state

    def fail(self, cause: str) -> None:
        """The engine failed: /health turns 503 ("failed") and every new request gets a 503 at once."""
        self.state, self.failure = "failed", cause

    def admit(self, requests: Sequence[GenerateRequest]) -> Ticket:
        if self.failure is not None:
            raise Unavailable(f"{self.failure}; the server is stopping")
        if self.state != "ready":
            raise Unavailable(f"the server is {self.state}; retry later")
        tokens = sum(len(r.prompt_token_ids) + r.params.max_tokens for r in requests)
        return self.admission.admit(len(requests), tokens)

    def refused(self, error: FrontendError, protocol: str) -> None:
        """Count a request refused before it ran (4xx apart from 5xx: ``FrontendError.outcome``)."""
        self.metrics.outcome(error.outcome, protocol)

    # ---- routing ----
    def route(self, token_ids: list[int]) -> tuple[int, list[int]]:
        hashes = block_hashes(token_ids, self.model.block_size)
        matched = [ix.match(hashes) for ix in self._indexes]
        r = choose_replica(matched, self._loads, self.routing, self._routed)
        self._routed += 1
        return r, hashes

    # ---- the stream ----
    async def generate(self, req: GenerateRequest, ticket: Ticket | None = None
                       ) -> AsyncIterator[TokenEvent | FinalEvent]:
        if not self.backends:
            raise Unavailable("no engine is loaded yet")
        arrival = time.monotonic()
        r, hashes = self.route(req.prompt_token_ids)
        cost = len(req.prompt_token_ids) + req.params.max_tokens
        self._loads[r] += cost
        self._indexes[r].insert(hashes)
        self.metrics.prompt_tokens.inc(len(req.prompt_token_ids))
        timings = Timings()
        text: list[str] = []
        out_ids: list[int] = []
        last = arrival
        outcome, reason = "aborted", None
        try:
            async for update in self.backends[r].stream(req.request_id, req.prompt_token_ids, req.params,
                                                        req.trace_experts):
                out = update.output
                now = time.monotonic()
                if update.queue_s is not None:
                    timings.queue_s = update.queue_s
                if out.new_token_ids:
                    if timings.ttft_s is None:
                        timings.ttft_s = now - arrival
                        self.metrics.ttft.observe(timings.ttft_s)
                        if ticket is not None:
                            ticket.started()
                    else:
                        timings.itl_s.append(now - last)
                        self.metrics.itl.observe(now - last)
                    last = now
                out_ids += out.new_token_ids
                text.append(out.text_delta)
                yield TokenEvent(out.new_token_ids, out.text_delta, out.logprobs, out.top_logprobs,
                                 update.expert_ids, now)
                if out.finished:
                    reason = out.finish_reason
                    timings.e2e_s = now - arrival
                    outcome = "ok"
                    yield FinalEvent(reason, len(req.prompt_token_ids), len(out_ids), "".join(text), out_ids,
                                     timings, out.num_draft_tokens, out.num_accepted_draft_tokens)
        except RequestError as e:
            outcome = "bad_request"
            raise BadRequest(str(e)) from None
        except StreamInterrupted as e:  # a rank died under the stream and resuming is off
            outcome = "error"
            raise EngineRankFailure(str(e)) from None
        except EngineLoopError as e:  # the engine stopped: a rank's failure (retryable elsewhere), or a bug
            outcome = "error"
            raise (EngineRankFailure if e.retryable else EngineFailure)(str(e)) from None
        except (RuntimeError, OSError) as e:
            outcome = "error"
            raise EngineFailure(str(e)) from None
        finally:
            self._loads[r] -= cost
            self.metrics.generation_tokens.inc(len(out_ids))
            self.metrics.outcome(outcome, req.protocol)
            self.audit.write(request_id=req.request_id, key_id=req.key_id, protocol=req.protocol,
                             prompt_sha256=prompt_hash(req.prompt_token_ids), prompt_tokens=len(req.prompt_token_ids),
                             completion_tokens=len(out_ids), outcome=outcome, finish_reason=reason)
