"""Speculative decoding over stage worker processes (gloo on CPU, real ZeroMQ sockets): greedy output with
the MTP module on, in pp / tp / ep layouts, is the output of one process without it, token for token.
The MTP passes run on the last stage's ranks (DraftPlanMsg); verification on the coordinator."""

from __future__ import annotations

import pytest
import test_engine  # noqa: E402  (tests/ is on sys.path via conftest)
from test_spec_decode import OracleDrafter

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.spec_config import SpeculativeConfig

VARIANT = "v3_noshared"  # 4 layers, first 2 dense: the MTP block (layer 4) is an MoE layer


def run(ckpt, k: int, oracle: dict | None = None, **parallel) -> list[list[int]]:
    spec = SpeculativeConfig(num_speculative_tokens=k, adaptive=False) if k else None
    engine = Engine(EngineConfig(model=str(ckpt), block_size=4, kv_cache_memory=1 << 22, max_num_seqs=8,
                                 max_num_batched_tokens=32, speculative_config=spec, **parallel))
    try:
        if oracle is not None:
            OracleDrafter.continuations = oracle
            engine.speculator = OracleDrafter(spec, engine.sampler, engine.outputs.eos_token_ids,  # type: ignore[arg-type]
                                              engine.config.torch_device)
        results = test_engine.run_staggered(engine)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        if k:
            assert engine.stats.num_draft_tokens > 0
            if oracle is not None:
                assert engine.stats.num_accepted_tokens > 0
        return [results[i] for i in range(len(test_engine.LENGTHS))]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory(VARIANT, mtp=True)


@pytest.fixture(scope="module")
def single(ckpt) -> list[list[int]]:
    return run(ckpt, 0)


@pytest.mark.parametrize("pp, tp, ep", [(2, 1, 1), (1, 2, 1), (1, 2, 2)])
def test_mtp_layout_equals_one_process_without(ckpt, single, pp: int, tp: int, ep: int) -> None:
    assert run(ckpt, 2, pp=pp, tp=tp, ep=ep) == single


def test_accepted_drafts_over_stages(ckpt, single) -> None:
    """Drafts that are mostly right (OracleDrafter): accepted runs and rollbacks across pp and tp ranks."""
    oracle = {tuple(p): out for p, out in zip(test_engine.prompts(), single)}
    assert run(ckpt, 3, oracle, pp=2, tp=2, ep=2) == single
