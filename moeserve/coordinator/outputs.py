"""Turning sampled tokens into per-request outputs: detokenization, stop conditions, streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeserve.coordinator.request import Request, RequestError, RequestStatus
from moeserve.coordinator.sampling import check_stop
from moeserve.coordinator.structured import StructuredOutput, StructuredOutputError, advance, spec_after
from moeserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    output_token_ids: list[int] | None = None  # the whole output, on the final delta
    output_text: str | None = None  # the whole text, on the final delta


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], vocab_size: int = 0):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.structured = StructuredOutput(tokenizer, vocab_size or (tokenizer.vocab_size if tokenizer else 0),
                                           eos_token_ids)

    def detokenizer(self, prompt_token_ids: list[int]) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids)

    def grammar(self, req: Request) -> None:
        """Give a request with structured output its matcher; RequestError for a bad spec."""
        spec = req.params.structured_output
        if spec is None:
            return
        try:
            req.grammar = self.structured.matcher(spec)
        except StructuredOutputError as e:
            raise RequestError(f"structured_output: {e}") from None
        req.grammar_after = spec_after(spec)

    def bitmask(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The allowed tokens of this step's constrained rows (see StructuredOutput.bitmask)."""
        if all(r.grammar is None for r in reqs):
            return None
        return self.structured.bitmask([r.grammar if r.grammar_after is None else None for r in reqs])

    def process(self, req: Request, token_id: int, logprob: float, top: dict[int, float] | None,
                now: float, max_model_len: int) -> RequestOutput:
        req.append_token(token_id, logprob, now)
        if req.grammar_after is None:
            advance(req.grammar, token_id, req.request_id)
        delta = req.detokenizer.step([token_id]) if req.detokenizer is not None else ""
        req.output_text += delta
        after = req.grammar_after
        if after is not None and req.output_text.find(after, max(0, len(req.output_text) - len(delta) - len(after))) >= 0:
            req.grammar_after = None  # the grammar applies from the next token on
        reason, cut = check_stop(req.params, req.output_token_ids, req.output_text, self.eos_token_ids, len(delta))
        if reason is None and req.num_tokens >= max_model_len:
            reason = "length"
        if reason is not None:
            if cut is None and req.detokenizer is not None:
                req.output_text += req.detokenizer.finish()
            elif cut is not None:
                req.output_text = req.output_text[:cut]
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
        text = self._emit(req)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[token_id], text_delta=text, finished=req.is_finished,
            finish_reason=req.finish_reason, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens, logprobs=[logprob],
            top_logprobs=[top] if top is not None else None,
            output_token_ids=list(req.output_token_ids) if req.is_finished else None,
            output_text=req.output_text if req.is_finished else None)

    @staticmethod
    def _emit(req: Request) -> str:
        """The next streamable text; holds back a tail that could still become a stop string."""
        end = len(req.output_text)
        if not req.is_finished and req.params.stop:
            end -= max(len(s) for s in req.params.stop) - 1
        if end <= req.num_text_emitted:
            return ""
        text = req.output_text[req.num_text_emitted:end]
        req.num_text_emitted = end
        return text
