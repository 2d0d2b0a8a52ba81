"""Tests for moeserve.model.tokenizer (Tokenizer + IncrementalDetokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.model.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "hello world",
    "héllo wörld 你好 🙂",
    "def f(x):\n    return x * 2  # ünïcödé ✓\n",
    "🙂🙂🙂 日本語のテキスト Привет",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def stream(tok: Tokenizer, prompt: list[int], ids: list[int], chunk: int = 1) -> list[str]:
    """All deltas (finish() last) for feeding ``ids`` in chunks of ``chunk``."""
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.finish()]


def test_metadata(tok: Tokenizer) -> None:
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == (1,)
    assert tok.vocab_size == 320
    assert tok.add_bos_default is True
    assert tok.chat_template and "messages" in tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>" + text


def test_config_variants(tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = Tokenizer.from_dir(tmp_path)
    assert bare.bos_token_id is None and bare.eos_token_ids == () and not bare.add_bos_default
    assert bare.encode("hi") == bare.encode("hi", add_bos=False)
    with pytest.raises(ValueError):
        bare.encode("hi", add_bos=True)
    cfg = {"bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 1, 7]}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.bos_token_id == 0 and t.eos_token_ids == (1, 5, 7)
    assert not t.add_bos_default  # config does not ask for BOS
    assert t.encode("hi", add_bos=True)[0] == 0


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_matches_decode(tok: Tokenizer, text: str, chunk: int) -> None:
    prompt = tok.encode("prompt: ")
    ids = tok.encode(text, add_bos=False)
    deltas = stream(tok, prompt, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_multibyte_chars_are_split_across_tokens(tok: Tokenizer) -> None:
    """Guard that the test above really exercises partial UTF-8 sequences."""
    ids = tok.encode("🙂", add_bos=False)
    assert len(ids) > 1
    assert tok.decode(ids[:1]).endswith(REPLACEMENT_CHAR)
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.step([i]) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_step_after_finish_raises(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    detok.step(tok.encode("a", add_bos=False))
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.step([5])


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


ID = st.integers(min_value=0, max_value=319)


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.lists(ID, max_size=6),
    ids=st.lists(ID, max_size=40),
    chunk=st.integers(min_value=1, max_value=4),
    skip=st.booleans(),
)
def test_incremental_property(
    tok: Tokenizer, prompt: list[int], ids: list[int], chunk: int, skip: bool
) -> None:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + detok.finish() == full
    assert detok.output_ids == ids
    if REPLACEMENT_CHAR not in full:
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
