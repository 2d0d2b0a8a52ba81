"""The CUDA-graph runner's host-side pieces, which need no GPU: the batch buckets and the decode inputs it
stages (they must equal what the eager path's metadata computes)."""

from __future__ import annotations

import numpy as np
import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.stages.cuda_graph import decode_buckets, decode_rows
from moeserve.stages.step_plan import StepPlan


def test_buckets_cover_every_batch_size() -> None:
    assert decode_buckets(256)[:6] == [1, 2, 4, 8, 16, 24] and decode_buckets(256)[-1] == 256
    for max_batch in (1, 3, 8, 20, 100):
        buckets = decode_buckets(max_batch)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
        for b in range(1, max_batch + 1):  # every batch has a bucket at most 8 rows larger
            assert 0 <= next(x for x in buckets if x >= b) - b < 8


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
