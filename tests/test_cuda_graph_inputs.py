"""The CUDA-graph runner's host-side pieces, which need no GPU: the batch buckets and the decode inputs it
stages (they must equal what the eager path's metadata computes)."""

from __future__ import annotations

import numpy as np
import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.stages.cuda_graph import decode_buckets
from moeserve.stages.step_plan import StepPlan, decode_rows, pad_tables


def test_buckets_cover_every_batch_size() -> None:
    assert decode_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    for max_batch in (1, 3, 8, 20, 100, 300):
        buckets = decode_buckets(max_batch)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
        for b in range(1, max_batch + 1):  # every batch has a bucket at most a quarter (or 7 rows) larger
            assert 0 <= next(x for x in buckets if x >= b) - b <= max(7, b // 4)


def test_decode_rows_equal_the_eager_metadata() -> None:
    gen = torch.Generator().manual_seed(1)
    block_size = 16
    lengths = [1, 16, 17, 100, 63]  # tokens already cached per sequence
    tables = [torch.randperm(50, generator=gen)[:-(-(n + 1) // block_size)].tolist() for n in lengths]
    plan = StepPlan(token_ids=[5, 6, 7, 8, 9], query_lens=[1] * 5, num_computed=lengths, block_tables=tables,
                    sample_rows=list(range(5)))
    padded = np.zeros((5, max(map(len, tables))), dtype=np.int32)
    for row, table in enumerate(tables):
        padded[row, :len(table)] = table
    rows = decode_rows(plan, padded, block_size)
    meta = build_attn_metadata(torch.tensor(padded, dtype=torch.long), torch.tensor(lengths),
                               torch.ones(5, dtype=torch.long), block_size)
    assert rows[0].tolist() == plan.token_ids
    assert rows[1].tolist() == meta.positions.tolist()
    assert rows[2].tolist() == meta.slot_mapping.tolist()
    assert meta.decode_context_lens is not None and rows[3].tolist() == meta.decode_context_lens.tolist()


@torch.no_grad()
def test_graph_metadata_decodes_as_the_eager_metadata() -> None:
    """The metadata a decode graph captures (lengths on the device, tables as wide as the longest model
    context, padding rows in a sink block) gives the eager decode the same logits as the step's own metadata.
    MLA dims of the embedded default model (kv_lora_rank 96: the eager decode runs inside its graphs)."""
    from moeserve.model.config import ModelConfig
    from moeserve.model.deepseek import DeepseekModel
    from moeserve.model.synthetic import init_random_, tiny_config
    from moeserve.stages.cuda_graph import graph_metadata

    config = ModelConfig.from_dict(tiny_config(kv_lora_rank=96, qk_rope_head_dim=32, v_head_dim=64))
    model = init_random_(DeepseekModel(config), seed=2, std=0.2)
    block_size, num_blocks, max_blocks = 4, 24, 10
    sink = num_blocks - 1
    caches = {int(i): torch.zeros(num_blocks * block_size, config.kv_cache_dim) for i in model.layers}
    lengths = [3, 9, 13]  # tokens already cached per sequence
    tables = [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    gen = torch.Generator().manual_seed(0)
    padded = torch.tensor(pad_tables(tables))
    prompts = torch.randint(2, 256, (sum(lengths),), generator=gen)
    model(prompts, build_attn_metadata(padded, torch.zeros(3, dtype=torch.long), torch.tensor(lengths),
                                       block_size), caches)
    plan = StepPlan(token_ids=[5, 6, 7], query_lens=[1] * 3, num_computed=lengths, block_tables=tables,
                    sample_rows=[0, 1, 2])
    ref = model(torch.tensor(plan.token_ids), build_attn_metadata(padded, torch.tensor(lengths),
                                                                  torch.ones(3, dtype=torch.long), block_size),
                {i: c.clone() for i, c in caches.items()})
    batch = 4  # the bucket: one padding row, token 0 at position 0 in the sink block
    inputs = torch.tensor(np.concatenate([decode_rows(plan, pad_tables(tables), block_size),
                                          [[0], [0], [sink * block_size], [1]]], axis=1))
    wide = torch.full((batch, max_blocks), sink, dtype=torch.long)
    wide[:3, :padded.shape[1]] = padded
    meta = graph_metadata(inputs, wide, batch, block_size)
    out = model(inputs[0], meta, {i: c.clone() for i, c in caches.items()})
    assert meta.decode_context_valid.shape == (batch, max_blocks * block_size)
    # float32 rounding only: the eager decode pads the contexts to another length than the step's metadata,
    # and a CPU's BLAS may block the longer reduction otherwise (2e-5 apart on an AVX2-only EPYC)
    torch.testing.assert_close(out[:3], ref, rtol=1e-4, atol=1e-4)
