"""Turning sampled tokens into per-request outputs: detokenization, stop conditions, streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeserve.coordinator.request import Request, RequestError, RequestStatus
from moeserve.coordinator.sampling_params import stop_reason
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
    # the new tokens' log-probs where the request asked for logprobs (SamplingParams.logprobs not None); NaN for
    # greedy tokens of a request that did not (their log-probs would cost a logsumexp over the vocabulary)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    output_token_ids: list[int] | None = None  # the whole output, on the final delta
    output_text: str | None = None  # the whole text, on the final delta
    # speculative decoding, the request's so far: draft tokens verified, and accepted (OpenAI's usage names
    # these completion_tokens_details.accepted / rejected_prediction_tokens)
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0


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

    def process_batch(self, reqs: list[Request], token_ids: list[int], logprobs: list[float],
                      top: tuple[list[list[float]], list[list[int]]] | None, now: float, max_model_len: int
                      ) -> list[RequestOutput]:
        """The outputs of one sampled batch (``top``: the rows' top logprobs, values and ids): one per
        request, except a request that finished before it (with async scheduling, the batch that was in
        flight computed a token for it; that token is discarded). Finishing requests get their status."""
        outputs = []
        for row, req in enumerate(reqs):
            if req.status is RequestStatus.FINISHED:
                continue
            top_row = None
            if top is not None and req.params.logprobs:
                n = req.params.logprobs
                top_row = dict(zip(top[1][row][:n], top[0][row][:n]))
            outputs.append(self.process(req, token_ids[row], logprobs[row], top_row, now, max_model_len))
        return outputs

    def process(self, req: Request, token_id: int, logprob: float, top: dict[int, float] | None,
                now: float, max_model_len: int) -> RequestOutput:
        """Append one sampled token: detokenize, check the stop conditions, and stream what is safe to.
        NOTE: the hot path of every step (once per request): sizes are read once, not through properties,
        and the common request (no grammar, no stop strings) takes no branch it does not need."""
        req.append_token(token_id, logprob, now)
        num_tokens = len(req.token_ids)
        num_prompt = len(req.prompt_token_ids)
        params = req.params
        delta = ""
        if req.grammar is not None and req.grammar_after is None:
            advance(req.grammar, token_id, req.request_id)
        if req.detokenizer is not None:
            delta = req.detokenizer.step((token_id,))
            if delta:
                req.output_text += delta
                after = req.grammar_after
                if after is not None and req.output_text.find(
                        after, max(0, len(req.output_text) - len(delta) - len(after))) >= 0:
                    req.grammar_after = None  # the grammar applies from the next token on
        reason, cut = stop_reason(params, token_id, num_tokens - num_prompt, req.output_text,
                                  self.eos_token_ids, len(delta))
        if reason is None and num_tokens >= max_model_len:
            reason = "length"
        if reason is None:
            return RequestOutput(req.request_id, [token_id], self._emit(req, False) if delta else "",
                                 num_prompt_tokens=num_prompt, num_output_tokens=num_tokens - num_prompt,
                                 logprobs=[logprob], top_logprobs=[top] if top is not None else None)
        if cut is None and req.detokenizer is not None:
            req.output_text += req.detokenizer.finish()
        elif cut is not None:
            req.output_text = req.output_text[:cut]
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[token_id], text_delta=self._emit(req, True),
            finished=True, finish_reason=reason, num_prompt_tokens=num_prompt,
            num_output_tokens=num_tokens - num_prompt, logprobs=[logprob],
            top_logprobs=[top] if top is not None else None,
            output_token_ids=req.token_ids[num_prompt:], output_text=req.output_text)

    def process_tokens(self, req: Request, token_ids: list[int], logprobs: list[float],
                       tops: list[dict[int, float] | None], now: float, max_model_len: int) -> RequestOutput:
        """Append several tokens (a verify step's accepted drafts and drawn token) one by one, as
        ``process`` does, up to the first that finishes the request; one output with all of them."""
        out = self.process(req, token_ids[0], logprobs[0], tops[0], now, max_model_len)
        for token_id, logprob, top in zip(token_ids[1:], logprobs[1:], tops[1:]):
            if out.finished:
                break
            more = self.process(req, token_id, logprob, top, now, max_model_len)
            out.new_token_ids += more.new_token_ids
            out.text_delta += more.text_delta
            out.logprobs += more.logprobs
            if out.top_logprobs is not None and more.top_logprobs is not None:
                out.top_logprobs += more.top_logprobs
            out.finished, out.finish_reason = more.finished, more.finish_reason
            out.num_output_tokens = more.num_output_tokens
            out.output_token_ids, out.output_text = more.output_token_ids, more.output_text
        return out

    @staticmethod
    def _emit(req: Request, finished: bool) -> str:
        """The next streamable text; holds back a tail that could still become a stop string."""
        end = len(req.output_text)
        if not finished and req.params.stop:
            end -= max(len(s) for s in req.params.stop) - 1
        if end <= req.num_text_emitted:
            return ""
        text = req.output_text[req.num_text_emitted:end]
        req.num_text_emitted = end
        return text
