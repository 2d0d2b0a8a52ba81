"""The eager decode attention (CPU, float32 and the other dtypes without the C++ kernel) pads each group of
similar context lengths to its own longest, not every sequence to the step's longest: one long context among
short ones no longer makes every row of the step gather and multiply its length. The logits are those of each
sequence decoded alone."""

from __future__ import annotations

import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.synthetic import init_random_, tiny_config

BLOCK_SIZE = 8


def decode_meta(tables: torch.Tensor, lens: list[int]):
    return build_attn_metadata(tables, torch.tensor(lens), torch.ones(len(lens), dtype=torch.long), BLOCK_SIZE)


def test_groups_start_where_a_length_passes_twice_the_shortest() -> None:
    tables = torch.arange(4 * 40).view(4, 40)
    groups = decode_meta(tables, [10, 300, 12, 9]).decode_length_groups  # contexts 11, 301, 13, 10
    assert [(rows.tolist(), n) for rows, n in groups] == [([3, 0, 2], 2), ([1], 38)]
    # padding to the longest at most doubles the rows: one batched product, no index
    assert decode_meta(tables[:3], [100, 120, 90]).decode_length_groups == [(None, 16)]


@torch.no_grad()
def test_a_step_of_mixed_lengths_gives_each_sequence_its_own_logits() -> None:
    config = ModelConfig.from_dict(tiny_config())
    model = init_random_(DeepseekModel(config), seed=5, std=0.2)
    tables = torch.arange(4 * 40).view(4, 40)
    caches = {int(i): torch.zeros(4 * 40 * BLOCK_SIZE, config.kv_cache_dim) for i in model.layers}
    lens = [9, 10, 12, 150]
    gen = torch.Generator().manual_seed(3)
    prompt = build_attn_metadata(tables, torch.zeros(4, dtype=torch.long), torch.tensor(lens), BLOCK_SIZE)
    model(torch.randint(2, 256, (sum(lens),), generator=gen), prompt, caches)
    ids = torch.randint(2, 256, (4,), generator=gen)
    step = decode_meta(tables, lens)
    assert len(step.decode_length_groups) == 2
    together = model(ids, step, caches).float()
    alone = torch.cat([model(ids[i:i + 1], decode_meta(tables[i:i + 1], lens[i:i + 1]), caches).float()
                       for i in range(4)])
    assert together.shape == alone.shape == (4, config.vocab_size)
    assert float((together - alone).abs().max()) <= 1e-5 * float(alone.abs().max())
