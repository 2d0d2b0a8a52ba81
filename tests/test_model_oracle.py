"""moeserve's model against the Hugging Face reference on tiny random checkpoints written by transformers.

For every variant: prefill logits within max|diff| / max|ref| <= 1e-4 in float32, and a 32-token greedy
continuation on moeserve's absorbed decode path equal to the reference token for token.
"""

from __future__ import annotations

import oracle
import oracle_reference
import pytest
import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.loader import load_model
from moeserve.model.mla import MLA
from moeserve.model.tokenizer import Tokenizer

NEW_TOKENS = 32
BLOCK = 8


def prompt_ids(ckpt) -> list[int]:
    tok = Tokenizer.from_dir(ckpt)
    return [0] + tok.encode("def heapify(x): héllo 你好", add_bos=False)[:11]


def greedy_absorbed(model, ids: list[int]) -> tuple[torch.Tensor, list[int], int]:
    """Prefill in one step, then decode token by token through the paged cache (absorbed MLA)."""
    num_blocks = (len(ids) + NEW_TOKENS) // BLOCK + 1
    caches = {int(i): torch.zeros(num_blocks * BLOCK, model.config.kv_cache_dim) for i in model.layers}
    table = torch.arange(num_blocks).unsqueeze(0)
    meta = build_attn_metadata(table, torch.tensor([0]), torch.tensor([len(ids)]), BLOCK)
    prefill = model(torch.tensor(ids), meta, caches, all_logits=True)
    out = [int(prefill[-1].argmax())]
    decode_steps = 0
    while len(out) < NEW_TOKENS:
        n = len(ids) + len(out) - 1
        meta = build_attn_metadata(table, torch.tensor([n]), torch.tensor([1]), BLOCK)
        assert meta.num_decode_tokens == 1 and meta.num_prefill_seqs == 0  # the absorbed path
        out.append(int(model(torch.tensor([out[-1]]), meta, caches)[0].argmax()))
        decode_steps += 1
    return prefill, out, decode_steps


@pytest.mark.parametrize("variant", sorted(oracle.VARIANTS))
def test_matches_reference(ckpt_factory, variant: str) -> None:
    ckpt = ckpt_factory(variant, shards=2 if variant.startswith("v3") else 1)
    ids = prompt_ids(ckpt)
    ref_logits, ref_tokens = oracle_reference.reference_outputs(ckpt, ids, NEW_TOKENS)
    model = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        logits, tokens, steps = greedy_absorbed(model, ids)
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert rel <= 1e-4, f"{variant}: prefill logits differ, max|diff|/max|ref| = {rel:.2e}"
    assert steps == NEW_TOKENS - 1
    assert tokens == ref_tokens, f"{variant}: greedy tokens differ"


def test_decode_never_builds_per_head_kv(ckpt_factory, monkeypatch) -> None:
    """The absorbed decode path must not up-project the cache to per-head K/V (no kv_b_proj over context)."""
    ckpt = ckpt_factory("v3_noaux_norm")
    model = load_model(ckpt)
    calls = []
    monkeypatch.setattr(MLA, "_prefill", lambda *a, **k: calls.append(1))
    ids = prompt_ids(ckpt)
    caches = {int(i): torch.zeros(64 * BLOCK, model.config.kv_cache_dim) for i in model.layers}
    meta = build_attn_metadata(torch.arange(8).unsqueeze(0), torch.tensor([len(ids)]), torch.tensor([1]), BLOCK)
    with torch.no_grad():
        model(torch.tensor([5]), meta, caches)
    assert calls == []


def test_cache_bytes_per_token(ckpt_factory) -> None:
    ckpt = ckpt_factory("v3_noaux_norm")
    model = load_model(ckpt)
    c = model.config
    assert c.kv_cache_dim == c.kv_lora_rank + c.qk_rope_head_dim
    assert model.cache_bytes_per_token() == c.num_hidden_layers * c.kv_cache_dim * 4
    assert model.cache_bytes_per_token(torch.bfloat16) == c.num_hidden_layers * c.kv_cache_dim * 2
