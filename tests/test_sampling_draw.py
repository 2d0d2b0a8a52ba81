"""Tests for moeserve.coordinator.sampling_draw: the two-level inverse CDF, candidate widening for top-p, and
the sampler's row groups (greedy / full vocabulary / candidates) at vocabularies wider than one block."""

from __future__ import annotations

import torch

from moeserve.coordinator.sampling import Sampler, SamplingParams, make_sampling_batch
from moeserve.coordinator.sampling_draw import CDF_BLOCK, TOP_P_FIRST_CANDIDATES, inverse_cdf


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    b = len(params)
    batch = make_sampling_batch(params, [[]] * b, [[]] * b, [None] * b, "cpu")
    return Sampler().sample(logits, batch).token_ids


def test_inverse_cdf_picks_the_interval_that_holds_the_point() -> None:
    vocab = 3 * CDF_BLOCK + 77  # full blocks and a short last one
    weights = torch.rand(4, vocab, generator=gen(0)) ** 4
    weights[1, : 2 * CDF_BLOCK] = 0.0  # whole blocks of zero weight are skipped
    u = torch.rand(4, 500, generator=gen(1), dtype=torch.float64)
    exact = weights.double().cumsum(-1)  # [4, vocab]
    for j in range(u.shape[1]):
        ids = inverse_cdf(weights, u[:, j])
        point = u[:, j] * exact[:, -1]
        hi = exact.gather(1, ids[:, None]).squeeze(1)
        lo = hi - weights.double().gather(1, ids[:, None]).squeeze(1)
        slack = 1e-6 * exact[:, -1]  # the block sums are float32
        assert ((lo - slack <= point) & (point <= hi + slack)).all()
        assert (weights.gather(1, ids[:, None]) > 0).all()


def test_inverse_cdf_keeps_weights_a_float32_running_sum_would_lose() -> None:
    vocab = 129280
    weights = torch.ones(1, vocab)
    token = 100_003
    weights[0, token] = 1e-3  # 8e-9 of the total: below a float32 running sum's resolution near the end
    total = weights.double().sum()
    before = float(token)  # every earlier token weighs 1
    hit = torch.tensor([(before + 5e-4) / total], dtype=torch.float64)
    assert inverse_cdf(weights, hit).item() == token
    assert inverse_cdf(weights, torch.tensor([(before - 5e-4) / total], dtype=torch.float64)).item() == token - 1
    assert inverse_cdf(weights, torch.tensor([(before + 2e-3) / total], dtype=torch.float64)).item() == token + 1


def test_full_vocabulary_frequencies_match_softmax_across_blocks() -> None:
    torch.manual_seed(0)
    n, vocab = 4000, 5 * CDF_BLOCK + 3
    row = torch.full((vocab,), -4.0)
    heavy = [3, CDF_BLOCK + 10, 4 * CDF_BLOCK + 500, vocab - 1]
    row[heavy] = torch.tensor([1.0, 2.0, 0.5, 1.5])
    ids = sample(row.expand(n, vocab).contiguous(), [SamplingParams()] * n)
    freq = torch.bincount(ids, minlength=vocab).double() / n
    probs = torch.softmax(row.double(), 0)
    assert (freq[heavy] - probs[heavy]).abs().max() < 0.03
    assert abs(float(freq.sum() - freq[heavy].sum()) - float(1 - probs[heavy].sum())) < 0.03  # the tail


def test_top_k_frequencies_match_truncated_softmax() -> None:
    torch.manual_seed(1)
    n, vocab, k = 4000, 3000, 5
    row = torch.randn(vocab, generator=gen(2))
    ids = sample(row.expand(n, vocab).contiguous(), [SamplingParams(top_k=k, temperature=0.5)] * n)
    best = row.topk(k).indices
    assert torch.isin(ids, best).all()
    freq = torch.bincount(ids, minlength=vocab).double()[best] / n
    probs = torch.softmax(row[best].double() / 0.5, 0)
    assert (freq - probs).abs().max() < 0.03


def test_top_p_widens_past_the_first_candidates() -> None:
    """A flat row: the nucleus of top-p 0.9 holds ~90% of 5,000 tokens, far past the first candidates."""
    torch.manual_seed(3)
    vocab, p = 5000, 0.9
    row = torch.randn(vocab, generator=gen(4)) * 0.1
    n = 400
    ids = sample(row.expand(n, vocab).contiguous(), [SamplingParams(top_p=p)] * n)
    x = row.double()
    order = x.argsort(descending=True)
    probs = torch.softmax(x, 0)[order]
    before = probs.cumsum(0) - probs
    rank = torch.empty(vocab, dtype=torch.long)
    rank[order] = torch.arange(vocab)
    allowed_ranks = int((before < p + 1e-5).sum())
    assert (rank[ids] < allowed_ranks).all()
    assert (rank[ids] >= TOP_P_FIRST_CANDIDATES * 8).any()  # drew from past the second widening


def test_three_row_groups_land_in_their_rows() -> None:
    """Greedy, full-vocabulary and candidate rows in one batch: each row's token comes from its own logits."""
    vocab = 2 * CDF_BLOCK + 5
    logits = torch.randn(6, vocab, generator=gen(5))
    winners = torch.tensor([7, CDF_BLOCK + 1, 2 * CDF_BLOCK + 4, 0, 100, vocab - 1])
    logits[torch.arange(6), winners] = 40.0
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=3),
              SamplingParams(top_p=0.5), SamplingParams(min_p=0.5), SamplingParams(temperature=0.0)]
    assert torch.equal(sample(logits, params), winners)
