"""Speculative decoding with the MTP module, in one process: greedy output with it on is the output with it
off token for token (chunked prefill, preemption, K = 1 and chained K = 3, drafts accepted or not), stop
conditions hold inside accepted runs, and the rejection sampler's accepted tokens follow the main model's
distribution (a statistical test on a small vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.request import Request
from moeserve.coordinator.sampling import Sampler, SamplingParams
from moeserve.coordinator.spec_config import SpeculativeConfig, SpeculativeConfigError
from moeserve.coordinator.spec_decode import Speculator
from moeserve.model.loader import MTPError

PROMPTS = [[0, 5, 7, 9, 11, 13, 200, 31, 17, 4], [0, 99, 98, 97], [0] + list(range(40, 81)),
           [0, 3, 1, 4, 1, 5, 9, 2, 6]]


def engine(ckpt, k: int, **kw) -> Engine:
    spec = SpeculativeConfig(num_speculative_tokens=k, adaptive=False) if k else None
    return Engine(EngineConfig(model=str(ckpt), speculative_config=spec, **kw))


def greedy(max_tokens: int = 20, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(eng: Engine, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [list(o.output_token_ids or []) for o in eng.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def mtp_ckpt(ckpt_factory):
    return ckpt_factory("v3_noaux_norm", mtp=True)


@pytest.fixture(scope="module")
def plain_outputs(mtp_ckpt) -> list[list[int]]:
    return run(engine(mtp_ckpt, 0, kv_cache_memory=1 << 22), greedy())


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_mtp_is_greedy_without(mtp_ckpt, plain_outputs, k: int) -> None:
    """Chunked prefill (16-token budget) and a cache small enough to preempt: the same tokens."""
    eng = engine(mtp_ckpt, k, kv_cache_memory=8 * 16 * 4 * 24 * 4, max_num_batched_tokens=16)
    assert run(eng, greedy()) == plain_outputs
    assert eng.stats.num_preemptions > 0
    assert eng.stats.num_draft_tokens > 0


class OracleDrafter(Speculator):
    """A drafter that knows the plain greedy continuation and gets every third draft wrong: accepted runs of
    every length, rejections and the cache rollback after them, without depending on the MTP module's skill."""

    continuations: dict[tuple[int, ...], list[int]] = {}

    def draft(self, runner, plan, scheduled, num_drafts) -> None:
        for req, k in num_drafts.items():
            cont = self.continuations[tuple(req.prompt_token_ids)]
            n = req.num_output_tokens
            ids = cont[n:n + k]
            req.spec_token_ids = [(t + 1) % 320 if (n + j) % 3 == 2 else t for j, t in enumerate(ids)]
            req.spec_probs = None


def test_accepted_drafts_keep_the_greedy_output(mtp_ckpt, plain_outputs) -> None:
    eng = engine(mtp_ckpt, 3, kv_cache_memory=1 << 22, max_num_batched_tokens=24)
    OracleDrafter.continuations = {tuple(p): out for p, out in zip(PROMPTS, plain_outputs)}
    eng.speculator = OracleDrafter(eng.speculator.config, eng.sampler, eng.outputs.eos_token_ids,  # type: ignore[union-attr]
                                   eng.config.torch_device)
    assert run(eng, greedy()) == plain_outputs
    stats = eng.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.mean_acceptance_length > 1.5
    # stop conditions inside an accepted run: the output stops where the plain one does
    stop_at = plain_outputs[0][7]
    out = run(eng, greedy(stop_token_ids=(stop_at,)))[0]
    assert out == plain_outputs[0][:plain_outputs[0].index(stop_at) + 1]


def test_model_without_mtp_refuses(ckpt_factory) -> None:
    with pytest.raises(MTPError) as info:
        engine(ckpt_factory("v3_noaux_norm"), 1, kv_cache_memory=1 << 22)
    assert "\n" not in str(info.value) and "num_nextn_predict_layers" in str(info.value)


def test_speculative_config_parsing() -> None:
    cfg = SpeculativeConfig.parse('{"method": "mtp", "num_speculative_tokens": 2}')
    assert cfg is not None and cfg.num_speculative_tokens == 2 and cfg.num_lookahead_tokens == 1
    assert SpeculativeConfig.parse("") is None
    for bad in ('{"method": "eagle"}', '{"method": "mtp", "num_speculative_tokens": 0}', "[1]", "{",
                '{"method": "mtp", "k": 1}', '{"num_speculative_tokens": 1}'):
        with pytest.raises(SpeculativeConfigError):
            SpeculativeConfig.parse(bad)


# ---- rejection sampling, statistically ----
VOCAB = 6
N = 20000
CHI2_CRITICAL = 25.7  # chi-square, 5 degrees of freedom, p = 1e-4


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def verify_many(p1: torch.Tensor, p2: torch.Tensor, q: torch.Tensor, speculator: Speculator, seed: int):
    """N requests, each with one draft d ~ q; target p1 at the draft's position, p2 after it."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q.expand(N, -1), 1, generator=gen).squeeze(1).tolist()
    reqs = []
    for d in drafts:
        req = Request("r", [0], SamplingParams(temperature=1.0, max_tokens=8))
        req.spec_token_ids, req.spec_probs = [d], q[None]
        reqs.append(req)
    logits = torch.stack([p1.log(), p2.log()]).repeat(N, 1)
    return speculator.verify(logits, reqs, [1] * N, None, False)


def test_rejection_sampling_follows_the_target() -> None:
    torch.manual_seed(0)
    p1 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    p2 = torch.tensor([0.40, 0.10, 0.10, 0.10, 0.20, 0.10])
    q = torch.tensor([0.30, 0.05, 0.30, 0.05, 0.10, 0.20])  # far from p1
    out = verify_many(p1, p2, q, Speculator(SpeculativeConfig(), Sampler(), (), torch.device("cpu")), 1)
    first = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=VOCAB).float()
    assert chi2(first, p1) < CHI2_CRITICAL
    seconds = torch.tensor([t[1] for t in out.token_ids if len(t) == 2])
    assert chi2(torch.bincount(seconds, minlength=VOCAB).float(), p2) < CHI2_CRITICAL
    # the acceptance rate is sum(min(p, q)), as the method says
    rate = sum(out.num_accepted) / N
    assert math.isclose(rate, float(torch.minimum(p1, q).sum()), abs_tol=0.015)
    # the test can fail: the draft distribution itself is far from the target
    drafts = torch.bincount(torch.multinomial(q.expand(N, -1), 1).squeeze(1), minlength=VOCAB).float()
    assert chi2(drafts, p1) > 100 * CHI2_CRITICAL


def test_embedded_model_drafts_with_its_trained_module() -> None:
    """The default model's MTP module (scripts/train_embedded_mtp.py) drafts well enough to be accepted often
    on code, and the greedy output stays the plain one."""
    prompts = ["def fib(n):", "import os\nimport sys\n\n\ndef main(argv):", "class Stack:\n    def __init__(self):"]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = Engine(EngineConfig(kv_cache_memory=1 << 24)).generate(prompts, params)
    spec = SpeculativeConfig(num_speculative_tokens=2, adaptive=False)
    eng = Engine(EngineConfig(kv_cache_memory=1 << 24, speculative_config=spec))
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == [o.output_token_ids for o in plain]
    assert eng.stats.num_accepted_tokens > 0.2 * eng.stats.num_draft_tokens > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embedded_model_drafts_on_cuda_graphs() -> None:
    """On a GPU (float32, fused kernels): the verify steps and the MTP passes (chained, K = 2) replay CUDA
    graphs; the greedy output is the plain one and the drafts are accepted as often as the trained module's
    are (a graph that drafted from the wrong rows or positions would be accepted almost never)."""
    prompts = ["def fib(n):", "import os\nimport sys\n\n\ndef main(argv):", "class Stack:\n    def __init__(self):"]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    cuda = dict(device="cuda", dtype="float32", kv_cache_memory=1 << 26, max_num_seqs=4)
    plain = Engine(EngineConfig(**cuda)).generate(prompts, params)
    eng = Engine(EngineConfig(**cuda, speculative_config=SpeculativeConfig(num_speculative_tokens=2,
                                                                           adaptive=False)))
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == [o.output_token_ids for o in plain]
    assert eng.stats.num_accepted_tokens > 0.2 * eng.stats.num_draft_tokens > 0
    runner = eng.executor.runner  # type: ignore[attr-defined]
    assert runner.graphs is not None and runner.graphs.buckets[-1] == 12  # 4 sequences x (1 + 2) rows
    assert runner.draft_graphs is not None and runner.draft_graphs.num_runs > 0


def test_policy_turns_speculation_down_where_it_is_slower() -> None:
    from moeserve.coordinator.spec_policy import SpecPolicy

    policy = SpecPolicy(probe_interval=8)
    decisions = []
    for _ in range(64):
        on = policy.wants_drafts(200)  # bucket 256: drafts emit 1.2 tokens a step at twice the step time
        policy.observe(200, on, 240 if on else 200, 0.2 if on else 0.1)
        decisions.append(on)
    assert decisions[:2] == [False, True] and sum(decisions[2:]) == 8  # then only the probes (every 8th) draft
    for _ in range(16):
        on = policy.wants_drafts(1)  # bucket 1: drafts emit 1.8 tokens a step at 1.3x the step time
        policy.observe(1, on, 2 if on else 1, 0.013 if on else 0.01)
    assert policy.wants_drafts(1) and not policy.wants_drafts(256)
