"""Compare grammar libraries for structured output on this CPU: JSON-schema compile time and per-step
token-mask time, for llguidance and outlines-core (xgrammar is not measured: it requires torch, transformers
and triton as install dependencies, see BENCHMARKS.md).

    python benchmarks/grammar_libs.py [--vocab 129280] [--steps 200]

Tokenizers: the embedded model's (4,096 tokens) and a synthetic byte-level BPE vocabulary of ``--vocab``
tokens (DeepSeek-V3's size by default), since the mask cost grows with the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ASSETS = Path(__file__).resolve().parent.parent / "moeserve" / "assets" / "default_model"

# A realistic API schema: nested objects, enums, arrays, bounded strings and integers.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 30},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "role": "admin",
       "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
       "tags": ["math", "poetry"], "scores": [1.5, 2.25], "active": True}


def synthetic_tokenizer(vocab: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE with ``vocab`` tokens: the 256 byte symbols, then random word pieces."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    rng = random.Random(seed)
    pieces = dict.fromkeys(sorted(alphabet))
    letters = "abcdefghijklmnopqrstuvwxyz0123456789_{}[]\":,.Ġ"
    while len(pieces) < vocab:
        pieces[("Ġ" if rng.random() < 0.4 else "") + "".join(rng.choices(letters, k=rng.randint(2, 9)))] = None
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[])
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def doc_tokens(tok: Tokenizer) -> list[int]:
    return tok.encode(json.dumps(DOC, separators=(",", ":"))).ids


def bench_llguidance(tok: Tokenizer, steps: int) -> dict[str, float]:
    import llguidance
    import numpy as np

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=0)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(lt, grammar)
    t2 = time.perf_counter()
    assert not matcher.is_error(), matcher.get_error()
    mask = np.zeros((tok.get_vocab_size() + 31) // 32, dtype=np.int32)
    times = []
    ids = doc_tokens(tok)
    for _ in range(max(1, steps // len(ids))):
        matcher.reset()
        for t in ids:
            s = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            times.append(time.perf_counter() - s)
            assert matcher.consume_token(t), matcher.get_error()
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_ms_median": 1e3 * statistics.median(times),
            "mask_ms_p99": 1e3 * sorted(times)[int(0.99 * (len(times) - 1))]}


def bench_outlines(tok: Tokenizer, steps: int) -> dict[str, float]:
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    vocab: dict[str, list[int]] = {}  # decoded text per token (timing only: partial UTF-8 pieces collapse)
    for i in tok.get_vocab().values():
        if i != 0:
            vocab.setdefault(tok.decode([i]), []).append(i)
    voc = Vocabulary(0, vocab)
    t1 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), voc)
    t2 = time.perf_counter()
    guide = Guide(index)
    mask = np.zeros((tok.get_vocab_size() + 31) // 32, dtype=np.int32)
    times = []
    ids = doc_tokens(tok)
    for _ in range(max(1, steps // len(ids))):
        guide.reset()
        for t in ids:
            s = time.perf_counter()
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)
            times.append(time.perf_counter() - s)
            guide.advance(t)
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_ms_median": 1e3 * statistics.median(times),
            "mask_ms_p99": 1e3 * sorted(times)[int(0.99 * (len(times) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--libs", default="llguidance,outlines-core")
    args = ap.parse_args()
    toks = {"embedded-4096": Tokenizer.from_file(str(ASSETS / "tokenizer.json")),
            f"synthetic-{args.vocab}": synthetic_tokenizer(args.vocab)}
    benches = {"llguidance": bench_llguidance, "outlines-core": bench_outlines}
    for name, tok in toks.items():
        for lib in args.libs.split(","):
            try:
                r = benches[lib](tok, args.steps)
            except Exception as e:  # noqa: BLE001 - a library that fails is reported, not fatal
                print(json.dumps({"tokenizer": name, "lib": lib, "error": f"{type(e).__name__}: {e}"}))
                continue
            print(json.dumps({"tokenizer": name, "lib": lib, **{k: round(v, 4) for k, v in r.items()}}),
                  flush=True)


if __name__ == "__main__":
    main()
