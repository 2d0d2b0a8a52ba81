"""Shared pytest fixtures: a trained tiny tokenizer and a per-session checkpoint cache."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle  # noqa: E402  (tests/ is not a package; make the helpers importable)
import oracle_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the oracle's trained tokenizer.json + tokenizer_config.json."""
    return oracle_tokenizer.train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Return ``make(variant, seed=0, shards=1, mtp=False) -> Path`` writing each checkpoint once per session
    (``mtp``: with a multi-token-prediction module, see ``oracle.write_checkpoint``).

    Checkpoints are float32; the same arguments always return the same directory.
    """
    cache: dict[tuple[str, int, int, bool], Path] = {}

    def make(variant: str, seed: int = 0, shards: int = 1, mtp: bool = False) -> Path:
        key = (variant, seed, shards, mtp)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt_{variant}_s{seed}_x{shards}{'_mtp' if mtp else ''}")
            cache[key] = oracle.write_checkpoint(out, variant, seed=seed, shards=shards, mtp=mtp)
        return cache[key]

    return make
