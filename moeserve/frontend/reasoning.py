"""DeepSeek-R1's reasoning split (``--reasoning-parser deepseek_r1``): the text inside ``<think> ... </think>``
is the reasoning, the rest the answer.

Two cases, as R1's chat templates make them: the prompt already opened ``<think>`` (R1-0528 and later end the
generation prompt with ``<think>\\n``), so the output is reasoning until ``</think>``; or it did not, so the
output is reasoning only if it starts (after whitespace) with ``<think>``, and is all answer otherwise.
``split_reasoning`` is that rule on a whole text; ``ReasoningSplitter`` applies it to a stream of text deltas
cut anywhere (inside a tag too), holding back only text that could still be part of a tag, so that the
deltas it returns always add up to ``split_reasoning`` of the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
PARSERS = ("deepseek_r1",)


@dataclass(frozen=True)
class Split:
    reasoning: str
    content: str


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether the prompt leaves a ``<think>`` open (the template started the reasoning)."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


def split_reasoning(text: str, opened: bool) -> Split:
    """The reference rule on a whole output text (see the module docstring)."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            return Split("", text)
        text = stripped[len(THINK_START):]
    end = text.find(THINK_END)
    if end < 0:
        return Split(text, "")
    return Split(text[:end], text[end + len(THINK_END):])


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Streams text deltas into (reasoning, content) deltas; ``finish`` flushes what was held back."""

    def __init__(self, opened: bool):
        self.state = "reasoning" if opened else "start"  # start -> reasoning -> content, or start -> content
        self.reasoned = opened  # whether the output is (or was) reasoning
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """True until the reasoning is known to be over (or known never to start)."""
        return self.state != "content"

    def feed(self, text: str) -> Split:
        buf = self._held + text
        self._held = ""
        if self.state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                self.state, buf, self.reasoned = "reasoning", stripped[len(THINK_START):], True
            elif THINK_START.startswith(stripped):  # empty, whitespace or a part of the tag: wait
                self._held = buf
                return Split("", "")
            else:
                self.state = "content"
        if self.state == "content":
            return Split("", buf)
        end = buf.find(THINK_END)
        if end >= 0:
            self.state = "content"
            return Split(buf[:end], buf[end + len(THINK_END):])
        keep = _partial_suffix(buf, THINK_END)
        self._held = buf[len(buf) - keep:]
        return Split(buf[:len(buf) - keep], "")

    def finish(self) -> Split:
        held, self._held = self._held, ""
        if self.state == "reasoning":
            return Split(held, "")
        return Split("", held)


class ReasoningStream:
    """A splitter that also counts reasoning tokens (those generated before the reasoning ended, the one
    that ends it included; tokens before ``<think>`` is known to open count only once it has) and keeps the
    whole reasoning and answer."""

    def __init__(self, opened: bool):
        self.splitter = ReasoningSplitter(opened)
        self.num_reasoning_tokens = 0
        self._undecided_tokens = 0  # fed while it is not known yet whether the output reasons
        self.reasoning: list[str] = []
        self.content: list[str] = []

    def feed(self, text: str, num_tokens: int) -> Split:
        was = self.splitter.state
        split = self.splitter.feed(text)
        if was == "reasoning":
            self.num_reasoning_tokens += num_tokens
        elif was == "start":
            self._undecided_tokens += num_tokens
            if self.splitter.state != "start":
                if self.splitter.reasoned:
                    self.num_reasoning_tokens += self._undecided_tokens
                self._undecided_tokens = 0
        return self._keep(split)

    def finish(self) -> Split:
        return self._keep(self.splitter.finish())

    def _keep(self, split: Split) -> Split:
        self.reasoning.append(split.reasoning)
        self.content.append(split.content)
        return split


def reasoning_final(stream: ReasoningStream, streaming: bool) -> dict[str, str]:
    """The token RPC's final-frame fields: what was held back (streaming), or the whole split."""
    rest = stream.finish()
    if streaming:
        return {"reasoning_delta": rest.reasoning, "content_delta": rest.content}
    return {"reasoning": "".join(stream.reasoning), "content": "".join(stream.content)}
