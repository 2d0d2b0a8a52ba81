"""DeepSeek-V3's tool-call format (``--tool-call-parser deepseek_v3``), parsed out of the answer text.

The model writes, after any plain text::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>  (more calls, whitespace between them)  <｜tool▁calls▁end｜>

``parse_tool_calls`` is the rule on a whole text; ``ToolCallStream`` applies it to text deltas cut anywhere,
emitting each call once its end marker has arrived, so streamed content and calls always add up to
``parse_tool_calls`` of the whole text. A call that does not match the format, or whose arguments are not a
JSON object, is returned as text (markers included), never dropped; so is an unfinished call and any text
between calls. Whitespace between the markers of the tool section is dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
PARSERS = ("deepseek_v3",)
_CALL = re.compile(r"(?P<type>[^\n<]*)" + re.escape(SEP) + r"(?P<name>[^\n]+)\n```json\n(?P<args>.*)\n```",
                   re.DOTALL)
_MARKERS = (CALL_BEGIN, CALLS_END)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the JSON object text as the model wrote it


@dataclass
class Parsed:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def format_call(name: str, arguments: str, kind: str = "function") -> str:
    """One call in the model's format (the inverse of the parser, for tests and prompts)."""
    return f"{CALL_BEGIN}{kind}{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


def _call_of(inner: str) -> ToolCall | None:
    m = _CALL.fullmatch(inner)
    if m is None:
        return None
    try:
        args = json.loads(m["args"])
    except ValueError:
        return None
    return ToolCall(m["name"].strip(), m["args"]) if isinstance(args, dict) and m["name"].strip() else None


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def parse_tool_calls(text: str) -> Parsed:
    """The reference rule on a whole output text."""
    stream = ToolCallStream()
    out = stream.feed(text)
    rest = stream.finish()
    return Parsed(out.content + rest.content, out.calls + rest.calls)


class ToolCallStream:
    """Text deltas in, (content delta, finished calls) out. States: ``content`` (looking for the tool
    section), ``item`` (inside it, before a call, garbage or the end marker), ``garbage`` (text inside the
    section up to the next marker)."""

    def __init__(self) -> None:
        self.state = "content"
        self._buf = ""
        self.num_calls = 0

    def feed(self, text: str) -> Parsed:
        self._buf += text
        out = Parsed()
        while True:
            step = getattr(self, f"_{self.state}")(out)
            if not step:
                return out

    def finish(self) -> Parsed:
        """Whatever is still held (a partial marker, an unfinished call) is text."""
        out, self._buf = Parsed(self._buf), ""
        return out

    # each step consumes from the buffer; True = call again, False = wait for more text
    def _content(self, out: Parsed) -> bool:
        i = self._buf.find(CALLS_BEGIN)
        if i >= 0:
            out.content += self._buf[:i]
            self._buf, self.state = self._buf[i + len(CALLS_BEGIN):], "item"
            return True
        keep = _partial_suffix(self._buf, (CALLS_BEGIN,))
        out.content += self._buf[:len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _item(self, out: Parsed) -> bool:
        self._buf = self._buf.lstrip()
        buf = self._buf
        if buf.startswith(CALL_BEGIN):
            end = buf.find(CALL_END)
            if end < 0:
                return False
            whole = buf[:end + len(CALL_END)]
            call = _call_of(buf[len(CALL_BEGIN):end])
            if call is None:
                out.content += whole
            else:
                out.calls.append(call)
                self.num_calls += 1
            self._buf = buf[len(whole):]
            return True
        if buf.startswith(CALLS_END):
            self._buf, self.state = buf[len(CALLS_END):], "content"
            return True
        if not buf or any(m.startswith(buf) for m in _MARKERS):
            return False
        self.state = "garbage"
        return True

    def _garbage(self, out: Parsed) -> bool:
        hits = [i for i in (self._buf.find(m) for m in _MARKERS) if i >= 0]
        if hits:
            out.content += self._buf[:min(hits)]
            self._buf, self.state = self._buf[min(hits):], "item"
            return True
        keep = _partial_suffix(self._buf, _MARKERS)
        out.content += self._buf[:len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        return False
