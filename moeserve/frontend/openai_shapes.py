"""The JSON shapes of OpenAI completions and chat completions: whole responses and stream chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from moeserve.frontend.chat_output import ChoiceParser
from moeserve.frontend.openai_api import usage
from moeserve.frontend.openai_tools import ChatSetup
from moeserve.frontend.service import FinalEvent, TokenEvent
from moeserve.model.tokenizer import Tokenizer


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_chars: int = 0
    num_draft_tokens: int = 0  # speculative decoding (FinalEvent)
    num_accepted_draft_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)  # chat: content entries; completions: per-token tuples

    @staticmethod
    def role_delta() -> dict[str, Any]:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


class ResponseShape:
    def __init__(self, chat: bool, response_id: str, model: str, created: int, tokenizer: Tokenizer | None,
                 num_choices: int, num_prompt_tokens: int, want_logprobs: bool = False,
                 setup: ChatSetup | None = None):
        self.chat = chat
        self.id, self.model, self.created = response_id, model, created
        self.tokenizer = tokenizer
        self.num_choices = num_choices
        self.num_prompt_tokens = num_prompt_tokens
        self.want_logprobs = want_logprobs
        self.choices = [ChoiceState() for _ in range(num_choices)]
        # chat with reasoning or tool parsing: each choice's text goes through its parser (chat_output.py)
        parse = chat and setup is not None and (setup.reasoning or setup.tool_mode != "none")
        self.parsers = [ChoiceParser(setup) for _ in range(num_choices)] if parse and setup else None

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- logprobs ----
    def _chat_logprobs(self, ev: TokenEvent) -> list[dict[str, Any]]:
        entries = []
        for k, (tid, lp) in enumerate(zip(ev.token_ids, ev.logprobs)):
            tok = self._token(tid)
            top = ev.top_logprobs[k] if ev.top_logprobs else {}
            entries.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": [
                {"token": (t := self._token(i)), "logprob": v, "bytes": list(t.encode())} for i, v in top.items()]})
        return entries

    def _completion_logprobs(self, ev: TokenEvent, offset: int) -> dict[str, Any]:
        toks = [self._token(t) for t in ev.token_ids]
        top = None
        if ev.top_logprobs is not None:
            top = [{self._token(i): v for i, v in row.items()} for row in ev.top_logprobs]
        offsets, pos = [], offset
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": list(ev.logprobs), "top_logprobs": top, "text_offset": offsets}

    def _logprobs(self, state: ChoiceState, ev: TokenEvent) -> Any:
        if not self.want_logprobs:
            return None
        if self.chat:
            entries = self._chat_logprobs(ev)
            state.logprobs.extend(entries)
            return {"content": entries}
        lp = self._completion_logprobs(ev, state.num_chars)
        state.logprobs.append(lp)
        return lp

    # ---- streaming ----
    def chunk(self, index: int, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                "created": self.created, "model": self.model, "choices": [{"index": index, **body}]}

    def _apply(self, index: int, ev: TokenEvent | FinalEvent) -> Any:
        state = self.choices[index]
        if isinstance(ev, FinalEvent):
            state.finish_reason = ev.finish_reason
            state.num_draft_tokens, state.num_accepted_draft_tokens = ev.num_draft_tokens, ev.num_accepted_draft_tokens
            return None
        state.text.append(ev.text_delta)
        state.num_tokens += len(ev.token_ids)
        lp = self._logprobs(state, ev)
        state.num_chars += len(ev.text_delta)
        return lp

    def _parsed_event(self, index: int, ev: TokenEvent | FinalEvent, lp: Any) -> dict[str, Any] | None:
        assert self.parsers is not None
        parser = self.parsers[index]
        if isinstance(ev, FinalEvent):
            return self.chunk(index, {"delta": parser.finish(), "logprobs": None,
                                      "finish_reason": self._finish_reason(index, ev.finish_reason)})
        delta = parser.feed(ev.text_delta, len(ev.token_ids))
        if not delta and lp is None:
            return None
        return self.chunk(index, {"delta": delta, "logprobs": lp, "finish_reason": None})

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        if self.parsers is not None and self.parsers[index].has_tool_calls and reason == "stop":
            return "tool_calls"
        return reason

    def stream_event(self, index: int, ev: TokenEvent | FinalEvent) -> dict[str, Any] | None:
        lp = self._apply(index, ev)
        if self.parsers is not None:
            return self._parsed_event(index, ev, lp)
        if isinstance(ev, FinalEvent):
            body: dict[str, Any] = {"logprobs": None, "finish_reason": ev.finish_reason}
            if self.chat:
                body["delta"] = {}
            else:
                body["text"] = ""
            return self.chunk(index, body)
        if not ev.text_delta and lp is None:
            return None
        text = {"delta": {"content": ev.text_delta}} if self.chat else {"text": ev.text_delta}
        return self.chunk(index, {**text, "logprobs": lp, "finish_reason": None})

    def _usage(self) -> dict[str, Any]:
        out: dict[str, Any] = usage(self.num_prompt_tokens, sum(c.num_tokens for c in self.choices))
        details: dict[str, int] = {}
        if self.parsers is not None and self.parsers[0].splitter is not None:
            details["reasoning_tokens"] = sum(p.num_reasoning_tokens for p in self.parsers)
        drafts = sum(c.num_draft_tokens for c in self.choices)
        if drafts:  # speculative decoding: OpenAI's names for predicted tokens kept and dropped
            accepted = sum(c.num_accepted_draft_tokens for c in self.choices)
            details.update(accepted_prediction_tokens=accepted, rejected_prediction_tokens=drafts - accepted)
        if details:
            out["completion_tokens_details"] = details
        return out

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                "created": self.created, "model": self.model, "choices": [], "usage": self._usage()}

    # ---- whole response ----
    async def collect(self, events: AsyncIterator[tuple[int, TokenEvent | FinalEvent]]) -> dict[str, Any]:
        async for index, ev in events:
            self._apply(index, ev)
            if self.parsers is not None:
                if isinstance(ev, FinalEvent):
                    self.parsers[index].finish()
                else:
                    self.parsers[index].feed(ev.text_delta, len(ev.token_ids))
        return self.response()

    def _logprobs_body(self, c: ChoiceState) -> Any:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": c.logprobs}
        merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for part in c.logprobs:
            for key in merged:
                merged[key].extend(part[key] or [])
        return merged

    def response(self) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            if self.parsers is not None:
                body = {"message": self.parsers[i].message()}
            choices.append({"index": i, **body, "logprobs": self._logprobs_body(c),
                            "finish_reason": self._finish_reason(i, c.finish_reason)})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}
