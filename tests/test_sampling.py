"""Tests for moeserve.coordinator.sampling: the batched sampler (greedy, seeds and distributions, filters,
penalties). Params validation and stop checks: test_sampling_params.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.coordinator.sampling import (
    Sampler,
    SamplingParams,
    make_sampling_batch,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    gens: list[torch.Generator | None] | None = None,
    eos: tuple[int, ...] = (),
):
    b = len(params)
    batch = make_sampling_batch(
        params, outputs or [[] for _ in range(b)], prompts or [[] for _ in range(b)],
        gens or [None] * b, logits.device, eos_token_ids=eos,
    )
    return Sampler().sample(logits, batch)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- greedy-equivalent settings


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_logprob(device: str) -> None:
    logits = torch.randn(8, 50, generator=gen(0)).to(device)
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 8
    batch = make_sampling_batch(params, [[]] * 8, [[]] * 8, [None] * 8, device)
    assert batch.all_greedy and not batch.need_penalties and batch.need_logprobs
    out = Sampler().sample(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_logprobs is None


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_without_logprobs_asked_skips_them(device: str) -> None:
    """No row asked for logprobs: the same argmax tokens, and NaN for their log-probs (no logsumexp over the
    vocabulary); one row asking is enough for every greedy row to get them."""
    logits = torch.randn(8, 50, generator=gen(0)).to(device)
    quiet = make_sampling_batch([SamplingParams(temperature=0.0)] * 8, [[]] * 8, [[]] * 8, [None] * 8, device)
    assert quiet.all_greedy and not quiet.need_logprobs
    out = Sampler().sample(logits, quiet)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.logprobs.isnan().all()
    one = [SamplingParams(temperature=0.0)] * 7 + [SamplingParams(temperature=0.0, logprobs=0)]
    asked = make_sampling_batch(one, [[]] * 8, [[]] * 8, [None] * 8, device)
    expected = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(Sampler().sample(logits, asked).logprobs, expected)


def test_greedy_rows_in_mixed_batch() -> None:
    logits = torch.randn(6, 40, generator=gen(1))
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, logprobs=0) for i in range(6)]
    out = run(logits, params, gens=[gen(i) for i in range(6)])
    greedy = out.token_ids[1::2]
    assert torch.equal(greedy, logits[1::2].argmax(-1))
    expected = torch.log_softmax(logits[1::2], -1).gather(1, greedy[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[1::2], expected)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-3),
        SamplingParams(top_k=1, temperature=1.5),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0, temperature=2.0),
    ],
    ids=["temperature->0", "top_k=1", "tiny top_p", "min_p=1"],
)
def test_settings_equivalent_to_greedy(params: SamplingParams) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 100, generator=gen(2)) * 5  # gaps between top logits >> 1e-3
    for _ in range(20):
        out = run(logits, [params] * 16)
        assert torch.equal(out.token_ids, logits.argmax(-1))


# ----------------------------------------------------------------------------- seeds and distribution


def _seeded_run(seed: int, logits: torch.Tensor, row: int, steps: int, others: bool) -> list[int]:
    """Generate `steps` tokens for one seeded request, optionally alongside other rows."""
    g = gen(seed)
    tokens = []
    for step in range(steps):
        if others:
            other = SamplingParams(seed=99 + step)
            params = [other, SamplingParams(), SamplingParams(seed=seed), SamplingParams()]
            gens = [gen(99 + step), None, g, None]
            tokens.append(int(run(logits[[0, 1, row, 2]], params, gens=gens).token_ids[2]))
        else:
            tokens.append(int(run(logits[[row]], [SamplingParams(seed=seed)], gens=[g]).token_ids[0]))
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    logits = torch.randn(4, 64, generator=gen(3))
    alone = _seeded_run(1234, logits, 3, 30, others=False)
    assert alone == _seeded_run(1234, logits, 3, 30, others=False)
    assert alone == _seeded_run(1234, logits, 3, 30, others=True)
    assert len(set(alone)) > 1  # actually random, not degenerate


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: P(same token) = 1e-3 per step
    a = _seeded_run(1, logits, 0, 50, others=False)
    b = _seeded_run(2, logits, 0, 50, others=False)
    assert sum(x == y for x, y in zip(a, b)) < 5


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_frequencies_match_softmax(seeded: bool) -> None:
    torch.manual_seed(0)
    n = 20000 if not seeded else 5000
    logits = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0]]).expand(n, 5).contiguous()
    gens = [gen(i) for i in range(n)] if seeded else None
    params = [SamplingParams(seed=i) if seeded else SamplingParams() for i in range(n)]
    out = run(logits, params, gens=gens)
    freq = torch.bincount(out.token_ids, minlength=5).double() / n
    probs = torch.softmax(logits[0].double(), -1)
    assert (freq - probs).abs().max() < (0.02 if not seeded else 0.03)


def test_sampled_logprob_is_tempered_log_softmax() -> None:
    logits = torch.randn(5, 30, generator=gen(4))
    out = run(logits, [SamplingParams(temperature=0.7, top_k=5)] * 5)
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)


def test_top_logprobs_are_raw() -> None:
    logits = torch.randn(3, 30, generator=gen(5))
    params = [SamplingParams(logprobs=4, repetition_penalty=3.0), SamplingParams(logprobs=2)]
    params.append(SamplingParams())
    out = run(logits, params, prompts=[[int(logits[0].argmax())], [], []])
    assert out.top_logprobs is not None
    vals, ids = out.top_logprobs
    assert vals.shape == ids.shape == (3, 4)
    ref = torch.log_softmax(logits, -1).topk(4, -1)
    torch.testing.assert_close(vals, ref.values)
    assert torch.equal(ids, ref.indices)
    assert run(logits, [SamplingParams(logprobs=0)] * 3).top_logprobs is None


# ----------------------------------------------------------------------------- filters never leak


logit_lists = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=30, unique=True)


@settings(max_examples=60, deadline=None)
@given(values=logit_lists, k=st.integers(1, 30), p=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_top_k_top_p_stay_in_allowed_set(values: list[float], k: int, p: float, seed: int) -> None:
    torch.manual_seed(seed)
    logits = torch.tensor(values).expand(200, len(values)).contiguous()
    params = [SamplingParams(top_k=k), SamplingParams(top_p=p), SamplingParams(top_k=k, top_p=p)] * 10
    tokens = run(logits[: len(params)], params).token_ids.view(10, 3)
    x = logits[0].double()  # the float32-rounded values the sampler saw
    rank = (x[None, :] > x[:, None]).sum(1)  # tokens strictly better than each token
    in_top_k = rank < k

    def top_p_ok(allowed: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(x.masked_fill(~allowed, float("-inf")), 0)
        before = ((x[None, :] > x[:, None]) * probs[None, :]).sum(1)
        return allowed & (before < p + 1e-5)

    assert in_top_k[tokens[:, 0]].all()
    assert top_p_ok(torch.ones_like(in_top_k))[tokens[:, 1]].all()
    assert top_p_ok(in_top_k)[tokens[:, 2]].all()


@settings(max_examples=40, deadline=None)
@given(values=logit_lists, min_p=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_min_p_stays_in_allowed_set(values: list[float], min_p: float, seed: int) -> None:
    torch.manual_seed(seed)
    logits = torch.tensor(values).expand(50, len(values)).contiguous()
    tokens = run(logits, [SamplingParams(min_p=min_p)] * 50).token_ids
    probs = torch.softmax(logits[0].double(), 0)
    assert (probs[tokens] >= min_p * probs.max() - 1e-6).all()


# ----------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_follow_formulas(device: str) -> None:
    raw = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]] * 2, device=device)
    pen = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    params = [dataclasses.replace(pen, logprobs=0), SamplingParams(temperature=0.0)]
    outputs, prompts = [[1, 2, 2], [1, 2, 2]], [[0], [0]]
    batch = make_sampling_batch(params, outputs, prompts, [None, None], device)
    got = Sampler._apply_penalties(raw, batch)
    # token 0: prompt only -> 2 / 2 = 1, no presence/frequency (output only)
    # token 1: output x1  -> -1 * 2 - 0.25 * 1 - 0.5 = -2.75
    # token 2: output x2  -> 0.5 / 2 - 0.25 * 2 - 0.5 = -0.75
    expected = torch.tensor([[1.0, -2.75, -0.75, -3.0, 1.0, 0.0], raw[1].tolist()], device=device)
    torch.testing.assert_close(got, expected)
    out = Sampler().sample(raw, batch)
    assert out.token_ids.tolist() == [0, 0]  # ties go to the first index
    torch.testing.assert_close(out.logprobs[0], torch.log_softmax(expected[0], -1)[0])


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(repetition_penalty=0.5), [4.0, -0.5, 1.0, -3.0]),
        (SamplingParams(presence_penalty=-1.0), [2.0, 0.0, 1.5, -3.0]),
        (SamplingParams(frequency_penalty=1.0), [2.0, -3.0, -1.5, -3.0]),
    ],
)
def test_each_penalty_alone(params: SamplingParams, expected: list[float]) -> None:
    raw = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    batch = make_sampling_batch([params], [[1, 2, 2, 1]], [[0]], [None], "cpu")
    got = Sampler._apply_penalties(raw, batch)
    assert got.tolist() == [expected]


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0, 0.0]])  # eos=1 best, stop id 2 second
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(2, 77))  # 77 >= vocab: ignored
    assert run(logits, [p], outputs=[[3]], eos=(1,)).token_ids.item() == 3
    assert run(logits, [p], outputs=[[3, 3, 3]], eos=(1,)).token_ids.item() == 1
    ign = dataclasses.replace(p, ignore_eos=True)
    assert run(logits, [ign], outputs=[[3]], eos=(1,)).token_ids.item() == 1


def test_make_sampling_batch_rejects_ragged_inputs() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        make_sampling_batch([SamplingParams()], [], [[]], [None], "cpu")
