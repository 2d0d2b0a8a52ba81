"""Property tests of the reasoning splitter and the DeepSeek-V3 tool-call parser: texts built from well-formed
parts, malformed calls, unclosed tags and garbage, cut at every position and into random chunks; the streamed
pieces always add up to the whole-text rule, and well-formed parts come back exactly."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.frontend.reasoning import THINK_END, THINK_START, ReasoningSplitter, Split, split_reasoning
from moeserve.frontend.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCall,
    ToolCallStream,
    format_call,
    parse_tool_calls,
)

ALPHABET = st.sampled_from(list("ab <>/{}\n`\":") + ["think", "｜", "▁"])
noise = st.lists(ALPHABET, max_size=12).map("".join)
tag_bits = st.sampled_from([THINK_START, THINK_END, THINK_START[:3], THINK_END[:4], THINK_END[2:], "\n\n", " "])
texts = st.lists(st.one_of(noise, tag_bits), max_size=10).map("".join)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


def stream_split(chunks: list[str], opened: bool) -> Split:
    s = ReasoningSplitter(opened)
    parts = [s.feed(c) for c in chunks] + [s.finish()]
    return Split("".join(p.reasoning for p in parts), "".join(p.content for p in parts))


@settings(max_examples=120, deadline=None)
@given(texts, st.booleans())
def test_reasoning_split_at_every_position(text: str, opened: bool) -> None:
    want = split_reasoning(text, opened)
    for p in range(len(text) + 1):
        assert stream_split([text[:p], text[p:]], opened) == want
    assert stream_split(list(text), opened) == want  # one character at a time


@settings(max_examples=120, deadline=None)
@given(texts, st.booleans(), st.lists(st.integers(0, 200), max_size=8))
def test_reasoning_split_random_chunks(text: str, opened: bool, cuts: list[int]) -> None:
    assert stream_split(chunked(text, cuts), opened) == split_reasoning(text, opened)


@given(st.text(max_size=30).filter(lambda t: THINK_END not in t and THINK_START not in t),
       st.text(max_size=30), st.booleans())
def test_reasoning_well_formed(reasoning: str, answer: str, opened: bool) -> None:
    text = ("" if opened else "\n" + THINK_START) + reasoning + THINK_END + answer
    assert split_reasoning(text, opened) == Split(reasoning, answer)
    assert stream_split(list(text), opened) == Split(reasoning, answer)


def test_reasoning_cases() -> None:
    assert split_reasoning("just an answer", opened=False) == Split("", "just an answer")
    assert split_reasoning("thinking, never closed", opened=True) == Split("thinking, never closed", "")
    assert split_reasoning("<think>unclosed", opened=False) == Split("unclosed", "")
    assert split_reasoning("a</think>b</think>c", opened=True) == Split("a", "b</think>c")
    s = ReasoningSplitter(opened=False)
    assert s.feed("  <thi") == Split("", "") and s.in_reasoning
    assert s.feed("nk>x</th") == Split("x", "")
    assert s.feed("ink>y") == Split("", "y") and not s.in_reasoning


# ---- tool calls ----
names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-99, 99) | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)
args = st.dictionaries(st.text(max_size=5), json_values, max_size=3).map(lambda d: json.dumps(d))
calls = st.builds(ToolCall, names, args)
plain = st.text(max_size=20).filter(lambda t: "<｜" not in t)


def stream_parse(chunks: list[str]) -> tuple[str, list[ToolCall]]:
    s = ToolCallStream()
    content, got = "", []
    for c in chunks:
        out = s.feed(c)
        content, got = content + out.content, got + out.calls
    out = s.finish()
    return content + out.content, got + out.calls


@settings(max_examples=100, deadline=None)
@given(plain, st.lists(calls, min_size=1, max_size=3), st.lists(st.sampled_from(["", "\n", " "]), min_size=4,
                                                                   max_size=4))
def test_well_formed_calls_come_back(prefix: str, want: list[ToolCall], gaps: list[str]) -> None:
    body = gaps[0].join(format_call(c.name, c.arguments) for c in want)
    text = prefix + CALLS_BEGIN + gaps[1] + body + gaps[2] + CALLS_END
    parsed = parse_tool_calls(text)
    assert parsed.content == prefix and parsed.calls == want
    for p in range(len(text) + 1):
        assert stream_parse([text[:p], text[p:]]) == (prefix, want)
    assert stream_parse(list(text)) == (prefix, want)


bad_calls = st.one_of(
    st.builds(lambda n: f"{CALL_BEGIN}function{SEP}{n}\n```json\n{{not json\n```{CALL_END}", names),
    st.builds(lambda n: f"{CALL_BEGIN}function{SEP}{n}\n```json\n[1, 2]\n```{CALL_END}", names),
    st.builds(lambda n: f"{CALL_BEGIN}function {n} no separator{CALL_END}", names),
    st.builds(lambda n, a: f"{CALL_BEGIN}function{SEP}{n}\n```json\n{a}", names, args),  # unfinished
)
tool_text = st.lists(st.one_of(plain, calls.map(lambda c: format_call(c.name, c.arguments)), bad_calls,
                               st.sampled_from([CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, CALLS_BEGIN[:4],
                                                CALL_END[3:], "\n"]), noise), max_size=8).map("".join)


@settings(max_examples=120, deadline=None)
@given(tool_text, st.lists(st.integers(0, 400), max_size=8))
def test_tool_parser_any_text_any_chunks(text: str, cuts: list[int]) -> None:
    whole = parse_tool_calls(text)
    for p in range(len(text) + 1):
        assert stream_parse([text[:p], text[p:]]) == (whole.content, whole.calls)
    assert stream_parse(chunked(text, cuts)) == (whole.content, whole.calls)
    for call in whole.calls:  # anything returned as a call has JSON-object arguments
        assert isinstance(json.loads(call.arguments), dict)


@settings(max_examples=100, deadline=None)
@given(plain, bad_calls)
def test_malformed_calls_are_text(prefix: str, bad: str) -> None:
    text = prefix + CALLS_BEGIN + bad
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and parsed.content == prefix + bad


def test_text_without_tool_section_is_untouched() -> None:
    text = "plain answer with <｜tool▁call▁begin｜> but no section"
    assert parse_tool_calls(text).content == text and parse_tool_calls(text).calls == []


def test_reasoning_tokens_are_counted_only_for_reasoning() -> None:
    from moeserve.frontend.reasoning import ReasoningStream

    s = ReasoningStream(opened=False)
    for piece in [" ", "<th", "ink>", "a", "b</think>", "answer"]:
        s.feed(piece, 1)
    assert s.num_reasoning_tokens == 5 and "".join(s.content) == "answer"
    s = ReasoningStream(opened=False)
    for piece in [" ", "<th", "x", "y"]:  # never reasoned
        s.feed(piece, 1)
    assert s.num_reasoning_tokens == 0
    s = ReasoningStream(opened=True)
    for piece in ["a", "</think>", "b"]:
        s.feed(piece, 1)
    assert s.num_reasoning_tokens == 2 and "".join(s.reasoning) == "a"
