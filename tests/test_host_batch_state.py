"""State the engine keeps from one decode step to the next instead of rebuilding it per sequence: the sampling
batch (``SamplingBatchCache``) and a decode step's inputs computed on the host (``ModelRunner.step_inputs``).
Each must equal what a rebuild from scratch gives, as requests join, leave and are preempted."""

from __future__ import annotations

import dataclasses

import torch

from moeserve.coordinator.request import Request
from moeserve.coordinator.sampling import SamplingBatch, SamplingParams
from moeserve.coordinator.step_batch import SamplingBatchCache, sampling_batch_of
from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.stages.step_plan import StepPlan, pad_tables

CPU = torch.device("cpu")
EOS = (1,)


def same_batch(a: SamplingBatch, b: SamplingBatch) -> bool:
    for f in dataclasses.fields(SamplingBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif f.name == "seeded":
            if [(i, id(g)) for i, g in x] != [(i, id(g)) for i, g in y]:
                return False
        elif isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor):
            if not all(torch.equal(p, q) for p, q in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_sampling_batch_cache_equals_a_rebuild_as_requests_join_leave_and_return() -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, seed=3),
              SamplingParams(temperature=1.0, top_p=0.9, logprobs=2), SamplingParams(temperature=0.0, max_tokens=9)]
    reqs = [Request(f"r{i}", [5, 6, 7], p) for i, p in enumerate(params)]
    cache = SamplingBatchCache()
    rounds = [reqs[:2], reqs[:2], reqs[:3], reqs[:3], [reqs[0], reqs[2]],  # r2 joins, r1 leaves
              [reqs[0], reqs[2], reqs[1]], [reqs[0], reqs[2], reqs[1]], reqs[:2], reqs]  # r1 back (preempted)
    previous = None
    for i, rows in enumerate(rounds):
        got = cache.get(rows, CPU, EOS, None, False)
        assert same_batch(got, sampling_batch_of(rows, CPU, EOS, None, False)), i
        assert (got is previous) == (i > 0 and rows == rounds[i - 1]), i  # reused only for the same rows
        previous = got


def test_sampling_batch_cache_rebuilds_what_changes_per_step() -> None:
    """min_tokens (the blocked ids depend on the outputs so far), output history and a grammar mask: never
    reused."""
    cache = SamplingBatchCache()
    counted = [Request("a", [5, 6], SamplingParams(temperature=0.0, min_tokens=2, max_tokens=8))]
    counted[0].num_output_placeholders = 1  # as the engine counts the token being sampled
    first = cache.get(counted, CPU, EOS, None, False)
    assert first.blocked_ids is not None and cache.get(counted, CPU, EOS, None, False) is not first
    counted[0].token_ids += [9, 9]  # two outputs: min_tokens is met, nothing blocked any more
    assert cache.get(counted, CPU, EOS, None, False).blocked_ids is None
    plain = [Request("b", [5, 6], SamplingParams(temperature=0.0))]
    batch = cache.get(plain, CPU, EOS, None, False)
    assert cache.get(plain, CPU, EOS, None, True) is not batch
    mask = (torch.zeros(1, dtype=torch.long), torch.full((1, 1), -1, dtype=torch.int32))
    assert cache.get(plain, CPU, EOS, mask, False).token_bitmask is not None
    assert cache.get(plain, CPU, EOS, None, False).token_bitmask is None


def test_decode_step_inputs_equal_the_eager_metadata() -> None:
    """A decode-only step's positions, slots and lengths come from the host (numpy), the rest of the steps'
    from ``build_attn_metadata``: the same values, tables cut to the longest context's blocks (a table may
    hold a block past it: lookahead), and the token ids in the same copy."""
    from moeserve.model.config import ModelConfig
    from moeserve.model.deepseek import DeepseekModel
    from moeserve.model.synthetic import init_random_, tiny_config
    from moeserve.stages.runner import ModelRunner

    model = init_random_(DeepseekModel(ModelConfig.from_dict(tiny_config())), seed=0)
    block_size = 4
    runner = ModelRunner(model, 32, block_size, CPU)
    lengths = [3, 9, 0, 13]  # tokens already cached per sequence
    tables = [[0, 1], [2, 3, 4], [5], [6, 7, 8, 9, 10]]  # the last holds one block past its context
    for query_lens in ([1, 1, 1, 1], [1, 1, 3, 2]):
        plan = StepPlan(token_ids=list(range(10, 10 + sum(query_lens))), query_lens=query_lens,
                        num_computed=lengths, block_tables=tables, sample_rows=[0, 1, 2, 3])
        meta, token_ids = runner.step_inputs(plan)
        ref = build_attn_metadata(torch.tensor(pad_tables(tables)), torch.tensor(lengths), torch.tensor(query_lens),
                                  block_size)
        assert token_ids is not None and token_ids.tolist() == plan.token_ids
        assert meta.num_decode_tokens == ref.num_decode_tokens and (meta.prefill is None) == (ref.prefill is None)
        for name in ("positions", "slot_mapping", "decode_block_tables", "decode_context_lens", "logits_index"):
            a, b = getattr(meta, name), getattr(ref, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert runner.step_inputs(plan, with_token_ids=False)[1] is None


def test_padded_tables_equal_a_rebuild_as_sequences_join_grow_leave_and_return() -> None:
    """Through a real cache manager (whose tables keep their identity until they gain a block): every step's
    array equals ``pad_tables`` of the same tables, in shape and values, and is a new array each time."""
    from moeserve.kvstore.cache_manager import KVCacheManager
    from moeserve.stages.step_plan import PaddedTables

    kv = KVCacheManager(512, 4)
    padded = PaddedTables()
    lengths = {f"r{i}": 3 + i for i in range(12)}
    batch = list(lengths)
    arrays = []
    for step in range(40):
        if step == 10:
            batch = batch[2:]  # two leave
        if step == 15:
            kv.free(batch[-1])  # the newest is preempted: it comes back with its table rebuilt from scratch
            lengths[batch[-1]] = 1
        if step == 25:
            batch = batch + ["r0"]  # one returns
        tables = []
        for rid in batch:
            lengths[rid] += 1
            table = kv.allocate_slots(rid, lengths[rid])
            assert table is not None
            tables.append(table.block_ids)
        got = padded(tables)
        want = pad_tables(tables)
        assert got.shape == want.shape and (got == want).all(), step
        assert not any(got is a for a in arrays)
        arrays.append(got)
