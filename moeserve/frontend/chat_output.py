"""One chat choice's output turned into OpenAI message fields: R1 reasoning apart from the answer
(``reasoning_content``), and tool calls (``tool_calls``) -- parsed from DeepSeek-V3's format, or the forced
JSON of ``tool_choice`` required / named. Streaming and whole responses come from the same parser, so they
always agree.

``feed(text, num_tokens)`` and ``finish()`` return a delta: a dict of ``reasoning_content``, ``content`` and
``tool_calls`` (OpenAI's streaming shape: ``{"index", "id", "type", "function": {"name", "arguments"}}``),
each present only when there is something new. ``message()`` is the whole message once finished.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from moeserve.frontend.openai_tools import ChatSetup
from moeserve.frontend.reasoning import ReasoningStream, Split
from moeserve.frontend.tool_calls import ToolCallStream


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _forced_calls(text: str) -> list[tuple[str, str]] | None:
    """tool_choice required: the JSON array of {"name", "parameters"}; None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("parameters"), dict)
            for c in value):
        return None
    return [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]


class ChoiceParser:
    def __init__(self, setup: ChatSetup):
        self.setup = setup
        self.splitter = ReasoningStream(setup.opened) if setup.reasoning else None
        self.tools = ToolCallStream() if setup.tool_mode == "deepseek_v3" else None
        self.content: list[str] = []
        self.calls: list[dict[str, Any]] = []  # {"id", "type", "function": {"name", "arguments"}}
        self._forced: list[str] = []  # required: the whole JSON, parsed at the end

    @property
    def num_reasoning_tokens(self) -> int:
        return self.splitter.num_reasoning_tokens if self.splitter is not None else 0

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str, num_tokens: int) -> dict[str, Any]:
        if self.splitter is None:
            return self._answer(text, final=False)
        return self._merge(self.splitter.feed(text, num_tokens), final=False)

    def finish(self) -> dict[str, Any]:
        if self.splitter is None:
            return self._answer("", final=True)
        return self._merge(self.splitter.finish(), final=True)

    def _merge(self, split: Split, final: bool) -> dict[str, Any]:
        delta = self._answer(split.content, final)
        if split.reasoning:
            delta = {"reasoning_content": split.reasoning, **delta}
        return delta

    def _answer(self, text: str, final: bool) -> dict[str, Any]:
        """The answer text through the tool-call handling of this request."""
        mode = self.setup.tool_mode
        if mode == "named":
            return self._named(text)
        if mode == "required":
            self._forced.append(text)
            if not final:
                return {}
            calls = _forced_calls("".join(self._forced))
            if calls is None:
                return self._text("".join(self._forced))
            return {"tool_calls": [self._new_call(name, args) for name, args in calls]}
        if self.tools is None:
            return self._text(text)
        out = self.tools.feed(text)
        if final:
            rest = self.tools.finish()
            out.content, out.calls = out.content + rest.content, out.calls + rest.calls
        delta = self._text(out.content)
        if out.calls:
            delta["tool_calls"] = [self._new_call(c.name, c.arguments) for c in out.calls]
        return delta

    def _text(self, text: str) -> dict[str, Any]:
        if not text:
            return {}
        self.content.append(text)
        return {"content": text}

    def _new_call(self, name: str, arguments: str) -> dict[str, Any]:
        call = {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        return {"index": len(self.calls) - 1, **json.loads(json.dumps(call))}

    def _named(self, text: str) -> dict[str, Any]:
        """tool_choice names a function: the whole answer is its arguments, streamed as they come."""
        if not self.calls:
            delta = self._new_call(self.setup.tool_name, text)
            return {"tool_calls": [delta]}
        if not text:
            return {}
        self.calls[0]["function"]["arguments"] += text
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    def message(self) -> dict[str, Any]:
        content = "".join(self.content)
        msg: dict[str, Any] = {"role": "assistant", "content": content if content or not self.calls else None}
        if self.splitter is not None:
            msg["reasoning_content"] = "".join(self.splitter.reasoning) or None
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg
