"""Serving tokenizer built on the ``tokenizers`` library (no transformers dependency).

``Tokenizer`` loads a Hugging Face style model directory (``tokenizer.json`` plus optional
``tokenizer_config.json`` and ``generation_config.json``). ``IncrementalDetokenizer`` turns a
stream of generated token ids into text deltas without ever emitting half of a multi-byte
UTF-8 character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    """Return the JSON object in ``path``, or ``{}`` if the file does not exist."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """Token string from a tokenizer_config entry: a plain string or a dict with ``content``."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unsupported special-token entry: {value!r}")


def _as_id_list(value: Any) -> list[int]:
    """Normalise an ``eos_token_id`` style value (None, int or list of ints) to a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _chat_template(value: Any) -> str | None:
    """Chat template string from tokenizer_config: a string, or a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    raise ValueError(f"unsupported chat_template entry of type {type(value).__name__}")


class Tokenizer:
    """Text <-> token ids for one model.

    Contract: ``encode`` never adds special tokens other than an optional leading BOS (the
    tokenizer.json post-processor is bypassed so BOS is never doubled); ``decode`` is the
    ``tokenizers`` decode of the ids.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """Wrap ``backend``; ``add_bos_token`` is the default for ``encode(add_bos=None)``."""
        self._tok = backend
        self._bos = bos_token_id
        self._eos = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._add_bos = bool(add_bos_token) and bos_token_id is not None
        self.chat_template = chat_template
        # the text of each single id decoded so far, without / with special tokens (``decode_owned``): a
        # detokenizer decodes its last token alone at nearly every step; at most one entry per vocabulary id
        self._single_text: tuple[dict[int, str], dict[int, str]] = ({}, {})

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        """Load from a model directory.

        Requires ``tokenizer.json`` (raises ``FileNotFoundError`` naming the missing path).
        Optional ``tokenizer_config.json`` supplies ``bos_token``/``eos_token`` (strings or
        ``{"content": ...}`` dicts), ``add_bos_token`` and ``chat_template``. Optional
        ``generation_config.json`` supplies ``bos_token_id``/``eos_token_id`` (int or list).
        EOS ids are the tokenizer_config EOS first, then generation_config ids, deduplicated.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        backend = _HFTokenizer.from_file(str(tok_file))
        tcfg = _read_json(path / "tokenizer_config.json")
        gcfg = _read_json(path / "generation_config.json")

        def lookup(entry: Any) -> int | None:
            content = _token_content(entry)
            return None if content is None else backend.token_to_id(content)

        bos = lookup(tcfg.get("bos_token"))
        if bos is None and isinstance(gcfg.get("bos_token_id"), int):
            bos = gcfg["bos_token_id"]
        eos_first = lookup(tcfg.get("eos_token"))
        eos = ([eos_first] if eos_first is not None else []) + _as_id_list(gcfg.get("eos_token_id"))
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos,
            add_bos_token=tcfg.get("add_bos_token") is True,
            chat_template=_chat_template(tcfg.get("chat_template")),
        )

    @property
    def bos_token_id(self) -> int | None:
        """BOS id, or None if the tokenizer has none."""
        return self._bos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All ids that end generation (possibly empty), without duplicates."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer, added tokens included (the model may pad more)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos_default(self) -> bool:
        """Whether ``encode`` prepends BOS when ``add_bos`` is None."""
        return self._add_bos

    @property
    def backend(self) -> _HFTokenizer:
        """The ``tokenizers`` object (grammar libraries read the vocabulary from it)."""
        return self._tok

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``, with BOS prepended if ``add_bos`` (default: ``add_bos_default``).

        Raises ``ValueError`` if ``add_bos`` is True but the tokenizer has no BOS token.
        """
        if add_bos is None:
            add_bos = self._add_bos
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if not add_bos:
            return ids
        if self._bos is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        return [self._bos, *ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid or incomplete UTF-8 byte sequences become U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_owned(self, ids: list[int], skip_special_tokens: bool) -> str:
        """``decode`` of a list the caller made for it (not copied again); a single id's text is cached.
        NOTE: the detokenizers' hot path, once or twice per request per step."""
        if len(ids) != 1:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        cache = self._single_text[skip_special_tokens]
        text = cache.get(ids[0])
        if text is None:
            text = cache[ids[0]] = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


class IncrementalDetokenizer:
    """Streams text deltas for generated tokens (prefix-offset / read-offset scheme, as vLLM).

    Contract: ``"".join(step(...) for each batch) + finish() == tokenizer.decode(generated)``
    where ``generated`` is every id passed to ``step``. Decoding starts at the first generated
    token (the prompt is not used as decoding context, so a character split across the
    prompt/output boundary decodes exactly as ``decode(generated)`` does). A delta never ends
    in a U+FFFD that later tokens could still complete: a trailing U+FFFD is held back until
    more tokens arrive or ``finish`` is called. Each step decodes only the window
    ``ids[prefix_offset:]`` (the previous emitted chunk plus pending tokens), which stays a
    few tokens long unless the text keeps ending in U+FFFD (malformed byte streams).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        """Start a stream after ``prompt_ids``; offsets index into prompt + generated ids."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._prompt_len = len(self._ids)
        self.prefix_offset = self._prompt_len  # window start (token index)
        self.read_offset = self._prompt_len  # end of the last fully emitted chunk
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._held = 0  # chars of the pending part already emitted (before read_offset moves)
        self._finished = False

    @property
    def output_ids(self) -> list[int]:
        """Generated ids seen so far (a copy)."""
        return self._ids[self._prompt_len:]

    def _decode(self, start: int) -> str:
        """Decode ``ids[start:]`` with this stream's special-token setting."""
        return self._tok.decode_owned(self._ids[start:], self._skip)

    def step(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids`` and return the newly final text (possibly ``""``)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.step() called after finish()")
        if not new_ids:
            return ""
        self._ids.extend(map(int, new_ids))
        text = self._decode(self.prefix_offset)
        start = len(self._prefix_text) + self._held
        if not text.endswith(REPLACEMENT_CHAR):
            # Clean character boundary at the end: emit everything and slide the window.
            delta = text[start:]
            self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
            self._prefix_text = self._decode(self.prefix_offset)  # ids[prefix_offset:read_offset]
            self._held = 0
            return delta
        # Only the trailing U+FFFD can still change; everything before it is final.
        delta = text[start:-1]
        self._held += len(delta)
        return delta

    def finish(self) -> str:
        """Flush and return all remaining text (including a trailing U+FFFD); ends the stream."""
        if self._finished:
            return ""
        self._finished = True
        if self.read_offset == len(self._ids):
            return ""
        text = self._decode(self.prefix_offset)
        return text[len(self._prefix_text) + self._held:]
