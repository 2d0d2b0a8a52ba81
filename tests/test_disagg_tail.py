"""A decode instance loads a prompt's partial last block (its tail) with the full blocks, so that it computes
only the prompt's last token, as a decode row of its next step instead of a prefill chunk beside the streams it
decodes (kvstore/disagg.py). The cache manager's side (what a prefill instance holds, under which hashes) and
two engines in this process (the embedded model, float32 on CPU): the tokens are one colocated engine's."""

from __future__ import annotations

import uuid

import pytest

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.kvstore.cache_manager import KVCacheManager
from moeserve.kvstore.disagg import KvTransferParams
from moeserve.kvstore.prefix import ROOT_HASH, block_hashes, chain_hash, prompt_tail


@pytest.mark.parametrize("length,tail", [(10, (2, [8])), (9, None), (12, (2, [8, 9, 10])), (1, None)])
def test_a_held_prompt_ends_with_its_tail(length: int, tail: tuple | None) -> None:
    """Held: the full blocks short of the last token, then the block of the tail under the tail's hash (a full
    block on the prefill side when the prompt fills it: the decode side takes all of it but the last token)."""
    prompt = list(range(length))
    assert prompt_tail(prompt, 4) == (None if tail is None else (tail[0], tail[1]))
    kv = KVCacheManager(num_blocks=8, block_size=4)
    table = kv.allocate_slots("r", length).block_ids
    kv.cache_full_blocks("r", prompt, length)
    blocks, hashes = kv.hold("r", prompt)
    full = block_hashes(prompt[:(length - 1) // 4 * 4], 4)
    assert hashes[:len(full)] == full and list(blocks[:len(full)]) == list(table[:len(full)])
    if tail is None:
        assert len(hashes) == len(full)
    else:
        assert hashes[len(full):] == [chain_hash(full[-1] if full else ROOT_HASH, tail[1])]
        assert blocks[len(full):] == [table[tail[0]]]
        assert hashes[-1] not in block_hashes(prompt, 4)  # never a full block's hash
    kv.free("r")
    assert kv.num_free_blocks == 8 - len(blocks)  # held past the request, until released
    kv.release(blocks)
    assert kv.num_free_blocks == 8


def test_a_decode_instance_computes_only_the_last_prompt_token() -> None:
    """Prompts with and without a tail (53 and 49 tokens, 16-token blocks): the decode engine's first step for
    each is one token (a decode row), its greedy tokens the colocated engine's."""
    prompts = [[(7 * i + 3 * n) % 997 for i in range(n)] for n in (53, 49)]
    params = dict(max_tokens=5, temperature=0.0, ignore_eos=True)
    kw = dict(kv_cache_memory=32 << 20, kv_host_memory=0)
    alone = Engine(EngineConfig(**kw))
    try:
        reference = [alone.generate([p], SamplingParams(**params))[0].output_text for p in prompts]
    finally:
        alone.close()
    prefill = Engine(EngineConfig(disaggregation_mode="prefill", **kw))
    try:
        decode = Engine(EngineConfig(disaggregation_mode="decode", **kw))
        try:
            first_chunks = []
            schedule = decode.scheduler.schedule

            def recording(*args, **kwargs):  # the real scheduler's batches, their first chunks noted
                out = schedule(*args, **kwargs)
                first_chunks.extend(s.num_new_tokens for s in out.scheduled if not s.request.output_token_ids)
                return out

            decode.scheduler.schedule = recording  # type: ignore[method-assign]
            for prompt, expected in zip(prompts, reference):
                tid = uuid.uuid4().hex
                prefill.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                          kv_transfer=KvTransferParams(tid, True).to_json()))
                pull = KvTransferParams(tid, remote_addr=prefill.prefill_side.address,  # type: ignore[union-attr]
                                        fingerprint=prefill.fingerprint).to_json()
                out = decode.generate([prompt], SamplingParams(**params, kv_transfer=pull))
                assert out[0].output_text == expected
            assert first_chunks == [1, 1]
            snap = decode.kv.connector.snapshot()  # type: ignore[union-attr]
            block_bytes = 16 * 128 * 4 * 5
            assert snap["transfer_failures"] == 0 and snap["transfer_bytes"] == (3 + 1 + 3) * block_bytes
        finally:
            decode.close()
    finally:
        prefill.close()
