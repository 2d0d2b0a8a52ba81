"""Corpus (the stdlib's ``.py`` files), byte-level BPE tokenizer and token streams, cached under --cache-dir."""

from __future__ import annotations

import argparse
import hashlib
import os
import sysconfig
import time
from pathlib import Path

import numpy as np

from .common import (
    BOS,
    CACHE_FORMAT,
    EOS,
    EXCLUDED_DIRS,
    VAL_EVERY,
    VAL_OFFSET,
    VAL_SIZE_RANGE,
    VAL_SKIP_DIRS,
    log,
)


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SystemExit(f"no .py files found under {root}")
    return root, files


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def build_tokenizer(train_texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "special tokens must be ids 0 and 1"
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Each text -> <|bos|> ids <|eos|>, all concatenated (uint16)."""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([0] + enc.ids + [1], dtype=np.uint16))
    return np.concatenate(parts)


def validation_indices(rel: list[str], texts: list[str]) -> set[int]:
    """Indices of the held-out files: every VAL_EVERY-th eligible file (see common.py)."""
    eligible = [i for i, (r, t) in enumerate(zip(rel, texts))
                if r.split("/")[0] not in VAL_SKIP_DIRS and VAL_SIZE_RANGE[0] <= len(t) <= VAL_SIZE_RANGE[1]]
    val_idx = {i for n, i in enumerate(eligible) if n % VAL_EVERY == VAL_OFFSET % VAL_EVERY}
    if not val_idx:
        val_idx = {eligible[0] if eligible else 0}
    return val_idx


def cache_key(rel: list[str], texts: list[str], vocab_size: int, val_idx: set[int]) -> str:
    """Hash of the cache format, the settings and every file's name and contents."""
    h = hashlib.sha256(f"{CACHE_FORMAT}|{vocab_size}|{sorted(val_idx)}".encode())
    for name, text in zip(rel, texts):
        h.update(name.encode() + b"\0" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()[:16]


def load_or_build(cache: Path, train_texts: list[str], val_texts: list[str], vocab_size: int,
                  n_files: int, n_chars: int):
    """-> (tokenizer, train stream, val stream), from the cache entry or freshly built and stored there."""
    from tokenizers import Tokenizer

    if (cache / "tokenizer.json").is_file() and (cache / "train.npy").is_file() and (cache / "val.npy").is_file():
        tok = Tokenizer.from_file(str(cache / "tokenizer.json"))
        train, val = np.load(cache / "train.npy"), np.load(cache / "val.npy")
        log(f"data: cache hit {cache}")
        return tok, train, val
    log(f"data: training tokenizer and tokenising {n_files} files ({n_chars / 1e6:.1f}M chars)")
    tok = build_tokenizer(train_texts, vocab_size)
    train, val = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"tokenizer.json.{os.getpid()}"
    tok.save(str(tmp))
    np.save(cache / "train.npy", train)
    np.save(cache / "val.npy", val)
    tmp.replace(cache / "tokenizer.json")  # written last: marks the cache entry complete
    return tok, train, val


def prepare_data(args: argparse.Namespace) -> dict:
    """Corpus -> (tokenizer, train stream, val stream, file lists), cached under --cache-dir."""
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    texts = [read_text(f) for f in files]
    val_idx = validation_indices(rel, texts)
    cache = Path(args.cache_dir) / cache_key(rel, texts, args.vocab_size, val_idx)
    train_texts = [t for i, t in enumerate(texts) if i not in val_idx]
    val_texts = [t for i, t in enumerate(texts) if i in val_idx]
    t0 = time.time()
    tok, train, val = load_or_build(cache, train_texts, val_texts, args.vocab_size,
                                    len(files), sum(map(len, texts)))
    log(f"data: {root} | {len(files) - len(val_idx)} train files, {len(val_idx)} val files | "
        f"{len(train):,} train tokens, {len(val):,} val tokens | {time.time() - t0:.1f}s")
    return dict(tokenizer=tok, train=train, val=val, root=str(root), cache=str(cache),
                train_files=[r for i, r in enumerate(rel) if i not in val_idx],
                val_files=[r for i, r in enumerate(rel) if i in val_idx],
                chars=sum(map(len, texts)))
