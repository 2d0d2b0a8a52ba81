"""Structured output: a request's ``SamplingParams.structured_output`` (a JSON text, below) compiled with
llguidance into a grammar whose matcher, per request, masks the tokens that cannot continue it.

Specs: ``{"type": "json_schema", "schema": {...}}``, ``{"type": "json_object"}``, ``{"type": "regex",
"pattern": "..."}``, ``{"type": "choice", "choices": ["a", "b"]}``, ``{"type": "lark", "grammar": "..."}``;
any of them may add ``"after": "TEXT"``: the grammar starts with the token after the one that completes TEXT
in the output (a reasoning model thinks freely, then answers in the grammar: ``"after": "</think>"``).

Per step the engine asks ``StructuredOutput.bitmask`` for the rows that carry a matcher: their allowed tokens
as a packed bitmask ([rows, ceil(vocab / 32)] int32, bit ``t % 32`` of word ``t // 32`` = token t allowed),
computed on the host by llguidance and unpacked on the engine's device by the sampler. Each sampled token
then advances its request's matcher (``advance``). NOTE: llguidance was chosen over outlines-core and
xgrammar (BENCHMARKS.md): ~2 ms to compile a realistic schema where outlines-core took 6 s at a 129k
vocabulary, and it installs with no dependencies (xgrammar requires torch, transformers and triton).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)
SPEC_TYPES = ("json_schema", "json_object", "regex", "choice", "lark")
_JSON_OPTIONS = {"whitespace_flexible": False}


class StructuredOutputError(ValueError):
    """A structured-output spec that is malformed or that the grammar library cannot compile."""


def _grammar_text(spec: dict[str, Any]) -> str:
    import llguidance

    kind = spec.get("type")
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError("json_schema needs a 'schema' object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else {},
                                                             overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                             overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "regex" and isinstance(spec.get("pattern"), str):
        return llguidance.LLMatcher.grammar_from_regex(spec["pattern"])
    if kind == "choice" and isinstance(spec.get("choices"), list) and spec["choices"] \
            and all(isinstance(c, str) for c in spec["choices"]):
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec["choices"]))
    if kind == "lark" and isinstance(spec.get("grammar"), str):
        return llguidance.LLMatcher.grammar_from_lark(spec["grammar"])
    raise StructuredOutputError(f"structured_output must be one of the types {list(SPEC_TYPES)} with its "
                                f"field (schema, pattern, choices, grammar); got {json.dumps(spec)[:200]}")


@functools.lru_cache(maxsize=256)
def compile_spec(spec_text: str) -> str:
    """A spec's JSON text -> a validated llguidance grammar. Raises StructuredOutputError with the reason."""
    import llguidance

    try:
        spec = json.loads(spec_text)
    except ValueError as e:
        raise StructuredOutputError(f"structured_output is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise StructuredOutputError("structured_output must be a JSON object")
    try:
        grammar = _grammar_text(spec)
    except ValueError as e:  # llguidance raises ValueError for a schema that is not a JSON object
        raise StructuredOutputError(str(e)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise StructuredOutputError(f"the grammar cannot be compiled: {error}")
    return grammar


def spec_after(spec_text: str) -> str | None:
    """The spec's ``after`` text, if any (the spec must have compiled)."""
    after = json.loads(spec_text).get("after")
    return after if isinstance(after, str) and after else None


def spec_json(spec: dict[str, Any]) -> str:
    """The compact text of a spec. Keys keep their order: a schema's property order is the output's."""
    return json.dumps(spec, separators=(",", ":"))


class GrammarVocabulary:
    """What llguidance reads of a vocabulary: the bytes of every token id, and which ids are special.

    NOTE: built here rather than from the tokenizer's JSON because llguidance counts every *added* token as
    special (never matching text), while R1's ``<think>``, ``</think>`` and DeepSeek-V3's tool-call markers
    are added tokens that are not special: they are text the grammar must be able to match."""

    def __init__(self, backend: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        byte_level = type(backend.decoder).__name__ == "ByteLevel"
        unbyte = {c: b for b, c in enumerate(_byte_level_alphabet())}
        self.tokens: list[bytes] = []
        for i in range(vocab_size):
            piece = backend.id_to_token(i)
            if i in added:
                self.tokens.append(added[i].content.encode())
            elif piece is None:
                self.tokens.append(b"")
            elif byte_level:
                self.tokens.append(bytes(unbyte[c] for c in piece if c in unbyte))
            elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte fallback
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.special_token_ids = sorted(i for i, t in added.items() if t.special and i < vocab_size)
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.bos_token_id = None
        self._backend = backend

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # llguidance then always passes str
        return self._backend.encode(text, add_special_tokens=False).ids


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (bytes 0..255 in order), as ByteLevel BPE writes bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


class StructuredOutput:
    """One engine's grammar support: the llguidance tokenizer (built at the first constrained request) and
    matchers per request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer  # moeserve Tokenizer, or None (then no structured output)
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._ll_tokenizer: Any = None

    @property
    def num_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def _lltok(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance

            vocab = GrammarVocabulary(self._tokenizer.backend, self.vocab_size, self.eos_token_ids)
            wrapper = llguidance.TokenizerWrapper(vocab)
            try:
                self._ll_tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size,
                                                            eos_token=list(self.eos_token_ids) or None)
            except TypeError:
                # NOTE: llguidance < 1.7 takes one EOS id (the newest wheel for glibc < 2.31 is 1.6.1): a
                # finished grammar then allows the first of the model's EOS ids only
                self._ll_tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size,
                                                            eos_token=vocab.eos_token_id)
        return self._ll_tokenizer

    def matcher(self, spec_text: str) -> Any:
        """A fresh matcher for a request; raises StructuredOutputError (bad spec, or no tokenizer)."""
        import llguidance

        if self._tokenizer is None:
            raise StructuredOutputError("structured output needs a tokenizer")
        m = llguidance.LLMatcher(self._lltok(), compile_spec(spec_text), log_level=0)
        if m.is_error():
            raise StructuredOutputError(f"the grammar cannot be compiled: {m.get_error()}")
        return m

    def bitmask(self, matchers: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [R] long, bitmask [R, words] int32) of the rows whose matcher is live, or None."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_error()]  # None: not (yet) on
        if not rows:
            return None
        mask = torch.empty(len(rows), self.num_words, dtype=torch.int32)
        for k, row in enumerate(rows):
            v = mask[k]
            matchers[row].unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)
        return torch.tensor(rows, dtype=torch.long), mask


def advance(matcher: Any, token_id: int, request_id: str) -> None:
    """Move a request's matcher past its sampled token (an error state only logs: the mask then stops).
    A finished grammar (stopped: it took EOS) takes nothing more; only ``ignore_eos`` gets past that."""
    if matcher is None or matcher.is_stopped():
        return
    if not matcher.is_error() and not matcher.consume_token(token_id):
        logger.warning("request %s: token %d left its grammar: %s", request_id, token_id, matcher.get_error())


_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8)  # [256, 8]: bits of a byte


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, words] int32 packed -> [R, vocab] bool allowed, on ``bitmask``'s device.

    NOTE: a byte-table lookup (the int32 words read as little-endian bytes, as x86, Arm and GPUs store them):
    4x faster on CPU than shifting every word 32 times, at DeepSeek-V3's 129k vocabulary."""
    as_bytes = bitmask.contiguous().view(torch.uint8).long()  # [R, words * 4]
    bits = torch.nn.functional.embedding(as_bytes, _BYTE_BITS.to(bitmask.device))  # [R, words * 4, 8]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
