"""Drawing one token per sampled row with work in proportion to what the row asks for.

Pure tensor functions behind :meth:`Sampler.sample` (sampling.py). Each row draws ONE uniform number ``u``
(a seeded row from its own generator, so its tokens do not depend on the rest of the batch) and takes the
token where the running sum of its weights passes ``u`` times their total (inverse CDF), found in two
levels so that only one block of the vocabulary per row is summed token by token:

- a row with no top-k / top-p (at most min-p) draws from the whole vocabulary: one max, one exp and one
  pass of block sums over [R, vocab];
- a row with top-k / top-p draws from its best candidates only: ``topk`` of the largest k in the group
  (top-p alone starts at ``TOP_P_FIRST_CANDIDATES`` and widens while the kept mass runs past the
  candidates), then the same filter rule as a full sort, on [R, K].

No [R, vocab] sort and no [R, vocab] random numbers: at DeepSeek's 129,280-token vocabulary the
exponential race this replaces drew 4.1 M random numbers per step of 32 rows, and a top-p sort cost more.
"""

from __future__ import annotations

import torch

from moeserve.device_copy import to_device

# tokens per block of the two-level inverse CDF: block sums over the row, then one block's running sum
CDF_BLOCK = 1024
# candidates a top-p row without top-k starts from; multiplied by TOP_P_WIDEN while the nucleus is wider
TOP_P_FIRST_CANDIDATES = 128
TOP_P_WIDEN = 8


def uniforms(size: int, seeded: tuple[tuple[int, torch.Generator], ...], device: torch.device) -> torch.Tensor:
    """[size] float64 in [0, 1): one per row; the rows in ``seeded`` (row, generator) from their generator."""
    u = torch.rand(size, dtype=torch.float64, device=device)
    if seeded:
        rows = torch.tensor([row for row, _ in seeded], device=device)
        draws = [to_device(torch.rand(1, dtype=torch.float64, generator=g, device=g.device), device)
                 for _, g in seeded]
        u[rows] = torch.cat(draws)
    return u


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, index i with probability ``weights[r, i] / weights[r].sum()``: the first i whose running sum
    exceeds ``u[r]`` times the total. ``weights`` [R, V] float32 >= 0 (each row with a positive sum),
    ``u`` [R] float64 in [0, 1); returns [R] long.

    Two levels: float32 sums of blocks of ``CDF_BLOCK`` tokens, their running sum in float64, then the
    float64 running sum of the one block that holds the point. A token keeps its own weight however small
    (a float32 running sum over 129k tokens would round away weights below about 1e-7 of the total).
    """
    num_rows, width = weights.shape
    num_full = width // CDF_BLOCK
    parts = []
    if num_full:
        parts.append(weights[:, :num_full * CDF_BLOCK].reshape(num_rows, num_full, CDF_BLOCK).sum(-1))
    if width % CDF_BLOCK:
        parts.append(weights[:, num_full * CDF_BLOCK:].sum(-1, keepdim=True))
    block_sums = torch.cat(parts, 1).double()  # [R, NB]
    block_cdf = block_sums.cumsum(-1)
    point = u[:, None] * block_cdf[:, -1:]  # [R, 1]
    block = torch.searchsorted(block_cdf, point, right=True).clamp_(max=block_sums.shape[1] - 1)  # [R, 1]
    before = block_cdf.gather(1, block) - block_sums.gather(1, block)
    rest = (point - before).clamp_(min=0.0)  # [R, 1]
    offsets = torch.arange(CDF_BLOCK, device=weights.device)
    cols = block * CDF_BLOCK + offsets  # [R, CDF_BLOCK]
    w = weights.gather(1, cols.clamp(max=width - 1)).double() * (cols < width)
    inside = torch.searchsorted(w.cumsum(-1), rest, right=True)  # [R, 1]
    # NOTE: the block's float32 sum and its float64 running sum can differ in the last bits; a point past
    # the running sum's end takes the block's last token of positive weight
    last = torch.where(w > 0, offsets, 0).amax(-1, keepdim=True)
    inside = torch.where(inside >= CDF_BLOCK, last, inside)
    return (block * CDF_BLOCK + inside).squeeze(1).clamp_(max=width - 1)


def shifted_exp(logits: torch.Tensor, top: torch.Tensor, temperature: torch.Tensor | None,
                work: torch.Tensor | None) -> torch.Tensor:
    """exp((logits - top) / temperature) [R, V], computed in ``work`` ([R, V] float32 scratch) when given.

    NOTE: a fresh [32, 129280] float32 tensor is 16.5 MB, served by mmap and page-faulted in on every step,
    which cost more than the exp itself; one reused buffer and in-place steps avoid that."""
    weights = torch.sub(logits, top) if work is None else torch.sub(logits, top, out=work)
    if temperature is not None:
        weights.div_(temperature[:, None])
    return weights.exp_()


def draw_full(logits: torch.Tensor, temperature: torch.Tensor | None, min_p: torch.Tensor | None,
              u: torch.Tensor, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows without top-k / top-p. ``logits`` [R, V] float32, ``temperature`` / ``min_p`` [R] float32 or None
    (1 / off for every row), ``u`` [R], ``work``: see :func:`shifted_exp`. Returns (token ids [R] long,
    log-prob of each under log_softmax(logits / temperature) [R] float32)."""
    top = logits.amax(-1, keepdim=True)  # [R, 1]
    weights = shifted_exp(logits, top, temperature, work)  # [R, V]: probability * total
    log_total = torch.log(weights.sum(-1))
    if min_p is not None:  # a token stays when its probability is at least min_p times the best one's
        weights.mul_(weights >= min_p[:, None])
    ids = inverse_cdf(weights, u)
    return ids, _logprobs(logits, ids, top, temperature, log_total)


def _logprobs(logits: torch.Tensor, ids: torch.Tensor, top: torch.Tensor, temperature: torch.Tensor | None,
              log_total: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(1, ids[:, None]).squeeze(1) - top.squeeze(1)
    return (picked if temperature is None else picked / temperature) - log_total


def _kept(values: torch.Tensor, log_total: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None,
          min_p: torch.Tensor | None) -> torch.Tensor:
    """[R, K] bool: which of the K best tokens (``values`` [R, K] of logits / temperature, sorted descending)
    survive top-k, then top-p (mass strictly before a token < p, over the top-k-renormalised distribution),
    then min-p; the best token always stays. ``log_total`` [R]: log of the sum over the vocabulary of
    exp((logits - best) / temperature)."""
    num = values.shape[1]
    positions = torch.arange(num, device=values.device)[None, :]
    keep = positions < torch.where(top_k > 0, top_k, num + 1)[:, None]
    if top_p is not None:
        weights = torch.exp(values - values[:, :1]).double() * keep  # [R, K] = probs * total
        norm = torch.where(top_k > 0, weights.sum(-1), log_total.double().exp())[:, None]
        probs = weights / norm
        before = probs.cumsum(-1) - probs
        keep &= ~((before >= top_p[:, None]) & (top_p[:, None] < 1.0))
    keep[:, 0] = True
    if min_p is not None:
        keep &= torch.exp(values - values[:, :1]) >= min_p[:, None]
    return keep


def first_candidates(host_top_k: list[int], vocab: int, on_cpu: bool) -> tuple[int, bool]:
    """(how many best tokens :func:`draw_candidates` starts from, whether it may have to widen them), given
    the rows' top-k (0 = off): the largest top-k when every row has one (no row can need more), else at
    least ``TOP_P_FIRST_CANDIDATES`` on the CPU and the whole vocabulary elsewhere (a device sorts fast,
    and checking whether to widen would wait on it every step)."""
    if all(k > 0 for k in host_top_k):
        return min(vocab, max(host_top_k)), False
    return (min(vocab, max(max(host_top_k), TOP_P_FIRST_CANDIDATES)), True) if on_cpu else (vocab, False)


def draw_candidates(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor,
                    top_p: torch.Tensor | None, min_p: torch.Tensor | None, u: torch.Tensor,
                    candidates: tuple[int, bool], work: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Rows with top-k and/or top-p. ``top_k`` [R] long (0 = off), ``temperature`` / ``top_p`` / ``min_p``
    [R] float32 or None (off for every row), ``candidates``: (how many to start from, whether to widen them
    while a row's kept tokens run past them), from :func:`first_candidates`. Returns (token ids [R] long,
    log-probs [R] under log_softmax(logits / temperature), before any truncation). The best tokens of
    logits / temperature are those of the logits (temperature > 0), so only the candidates are divided."""
    vocab, (num, widen) = logits.shape[1], candidates
    top = logits.amax(-1, keepdim=True)
    log_total = torch.log(shifted_exp(logits, top, temperature, work).sum(-1))  # [R]
    while True:
        values, order = logits.sort(-1, descending=True) if num >= vocab else logits.topk(num, -1)
        if temperature is not None:
            values = values / temperature[:, None]
        keep = _kept(values, log_total, top_k, top_p, min_p)
        if num >= vocab or top_p is None or not widen:
            break
        # a row is covered when its kept tokens end inside the candidates (or its top-k ends there)
        if not bool((keep[:, -1] & ((top_k == 0) | (top_k > num))).any()):
            break
        num = min(vocab, num * TOP_P_WIDEN)
    weights = torch.exp(values - values[:, :1]) * keep
    ids = order.gather(1, inverse_cdf(weights, u)[:, None]).squeeze(1)
    return ids, _logprobs(logits, ids, top, temperature, log_total)
