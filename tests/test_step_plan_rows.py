"""A step plan's short prefill chunks as decode rows (``StepPlan.short_chunks_as_rows``, what the fast path runs
for a prefix hit's suffix): which plans change, and that the model computes the same logits and writes the same
latents through the rows as through the chunk (float32, the eager ops)."""

from __future__ import annotations

import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.synthetic import init_random_, tiny_config
from moeserve.stages.step_plan import StepPlan

BLOCK_SIZE = 8
TABLES = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def plan(computed: list[int], q_lens: list[int], sample_rows: list[int] | None = None) -> StepPlan:
    ids = list(range(2, 2 + sum(q_lens)))
    return StepPlan(ids, q_lens, computed, TABLES[:len(q_lens)],
                    list(range(len(q_lens))) if sample_rows is None else sample_rows)


def test_only_plans_whose_chunks_are_all_short_over_longer_contexts_change() -> None:
    decodes = plan([9, 12], [1, 1])
    assert decodes.short_chunks_as_rows(32) is decodes  # no chunk
    long_chunk = plan([9, 40], [1, 33])
    assert long_chunk.short_chunks_as_rows(32) is long_chunk  # a chunk past the limit
    short_context = plan([9, 4, 40], [1, 5, 3])
    assert short_context.short_chunks_as_rows(32) is short_context  # a chunk over fewer cached tokens than its own
    first_prefill = plan([0], [5])
    assert first_prefill.short_chunks_as_rows(32) is first_prefill


def test_a_chunk_becomes_one_row_a_token_and_is_sampled_at_its_last() -> None:
    p = plan([9, 40, 20], [1, 5, 3], sample_rows=[0, 1])  # the third chunk is not sampled (a chunk mid-prompt)
    p.pending_rows, p.pending_src = [0], [3]
    rows = p.short_chunks_as_rows(32)
    assert rows.query_lens == [1] * 9 and rows.token_ids == p.token_ids
    assert rows.num_computed == [9, 40, 41, 42, 43, 44, 20, 21, 22]
    assert rows.block_tables == [TABLES[0]] + [TABLES[1]] * 5 + [TABLES[2]] * 3
    assert rows.sample_rows == [0, 5]  # the decode's row and the chunk's last
    assert (rows.pending_rows, rows.pending_src) == ([0], [3])
    assert p.num_decode_rows == 1 and rows.num_decode_rows == 9


def test_verify_rows_then_chunk_rows() -> None:
    p = plan([9, 40], [3, 4])
    p.num_spec = [2, 0]  # the first sequence verifies two drafts; the second is a chunk
    rows = p.expanded().short_chunks_as_rows(32)
    assert rows.num_computed == [9, 10, 11, 40, 41, 42, 43]
    assert rows.sample_rows == [0, 1, 2, 6]  # every verify row, the chunk's last


@torch.no_grad()
def test_rows_give_the_chunks_logits_and_latents() -> None:
    config = ModelConfig.from_dict(tiny_config())
    model = init_random_(DeepseekModel(config), seed=4, std=0.2)
    caches = {int(i): torch.zeros(24 * BLOCK_SIZE, config.kv_cache_dim) for i in model.layers}
    gen = torch.Generator().manual_seed(5)

    def run(p: StepPlan, ids: torch.Tensor, into: dict[int, torch.Tensor]) -> torch.Tensor:
        tables = torch.tensor(p.block_tables)
        meta = build_attn_metadata(tables, torch.tensor(p.num_computed), torch.tensor(p.query_lens), BLOCK_SIZE)
        return model(ids, meta, into, all_logits=True)

    run(plan([0, 0, 0], [40, 25, 33]), torch.randint(2, 256, (98,), generator=gen), caches)  # the cached prefixes
    step = plan([40, 25, 33], [1, 7, 16])  # a decode and two short chunks over them
    ids = torch.randint(2, 256, (24,), generator=gen)
    as_rows = {i: c.clone() for i, c in caches.items()}
    chunk_logits = run(step, ids, caches)
    rows = step.short_chunks_as_rows(32)
    assert rows is not step
    row_logits = run(rows, ids, as_rows)
    assert torch.allclose(row_logits, chunk_logits, rtol=1e-4, atol=1e-5)
    assert (row_logits.argmax(-1) == chunk_logits.argmax(-1)).all()
    # the same slots written: the first layer's latents bit for bit, the later ones' within the attention's rounding
    assert torch.equal(as_rows[0], caches[0])
    for i in caches:
        assert torch.allclose(as_rows[i], caches[i], rtol=1e-4, atol=1e-5)
