"""MLA's absorbed form for short prefill chunks over a longer cached context (model/mla.py): the logits of every
token equal the expanded form's, in float32 and bfloat16, for a step that mixes decodes, short chunks over
cached prefixes (absorbed) and, in another step, chunks that are not short (expanded either way)."""

from __future__ import annotations

import pytest
import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.mla import MLA
from moeserve.model.synthetic import init_random_, tiny_config

BLOCK_SIZE, NUM_BLOCKS = 8, 48
# (num_computed, query_lens) per step, decodes first: two prompts; then decodes and short chunks over the
# cached prefixes (absorbed); then a chunk too long to absorb beside a decode
STEPS = [([0, 0, 0], [40, 33, 57]), ([40, 33, 57], [1, 5, 16]), ([41, 38, 73], [1, 1, 40])]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def logits_of(model: DeepseekModel, absorb: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Every token's logits over STEPS, with chunks of at most ``absorb`` tokens absorbed; and how many
    layer calls took the absorbed form."""
    calls = []
    original = MLA._prefill_absorbed

    def counted(self, *args):  # noqa: ANN001, ANN202 - the real method, counted
        calls.append(1)
        return original(self, *args)

    for layer in model.decoder_layers().values():
        layer.self_attn.absorb_max_query = absorb
    tables = torch.arange(NUM_BLOCKS).view(3, 16)
    caches = {int(i): torch.zeros(NUM_BLOCKS * BLOCK_SIZE, model.config.kv_cache_dim, dtype=dtype)
              for i in model.layers}
    gen = torch.Generator().manual_seed(7)
    out = []
    MLA._prefill_absorbed = counted  # type: ignore[method-assign]
    try:
        for computed, q_lens in STEPS:
            ids = torch.randint(2, 256, (sum(q_lens),), generator=gen)
            meta = build_attn_metadata(tables, torch.tensor(computed), torch.tensor(q_lens), BLOCK_SIZE)
            out.append(model(ids, meta, caches, all_logits=True).float())
    finally:
        MLA._prefill_absorbed = original  # type: ignore[method-assign]
    return torch.cat(out), len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_short_chunks_over_a_cached_prefix_absorbed_equal_expanded(dtype: torch.dtype) -> None:
    config = ModelConfig.from_dict(tiny_config())
    model = init_random_(DeepseekModel(config).to(dtype), seed=4, std=0.2)
    expanded, none = logits_of(model, 0, dtype)
    absorbed, calls = logits_of(model, 32, dtype)
    assert none == 0 and calls == len(model.decoder_layers())  # step 2 only, once per layer
    assert rel_err(absorbed, expanded) < (1e-5 if dtype == torch.float32 else 2e-2)
