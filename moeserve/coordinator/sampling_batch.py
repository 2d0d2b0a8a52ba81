"""The per-step sampling batch: each running request's sampling values as rows of one tensor, and the
penalty and grammar inputs, built once per step by :func:`make_sampling_batch` for :class:`Sampler`
(sampling.py)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from moeserve.coordinator.sampling_params import SamplingParams
from moeserve.device_copy import to_device

# the columns of a row of per-request sampling values (``SamplingParams.sampling_row``)
TEMPERATURE, GREEDY, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY, MIN_TOKENS, LOGPROBS = range(10)
NUM_COLUMNS = 10


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling state for B rows; built by :func:`make_sampling_batch`, all tensors on one device.

    Padded id tensors are [B, L] long (pad 0) with a [B, L] bool mask; None when no row needs them.
    Greedy rows hold temperature 1 and filters off so batched maths on them is harmless. The per-row
    values travel to the device in one copy, and only when a sampling path reads them (``rows``).
    """

    size: int
    host_rows: torch.Tensor  # [NUM_COLUMNS, B] float32 on the host (columns named above)
    device: torch.device
    output_ids: tuple[torch.Tensor, torch.Tensor] | None  # (ids, mask) [B, L]
    prompt_ids: tuple[torch.Tensor, torch.Tensor] | None  # (ids, mask) [B, Lp]; only for repetition
    blocked_ids: tuple[torch.Tensor, torch.Tensor] | None  # (ids, mask) [B, S]; stop/eos ids under min_tokens
    seeded: tuple[tuple[int, torch.Generator], ...]  # (row, generator) of non-greedy seeded rows
    all_greedy: bool
    need_repetition: bool
    need_presence_frequency: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    num_top_logprobs: int  # N = max requested logprobs; 0 = no top logprobs
    # whether a row asked for logprobs (its chosen token's at least): else the greedy rows take one argmax, and
    # the sampler reports NaN for the chosen tokens' log-probs instead of a logsumexp over the vocabulary
    need_logprobs: bool
    # structured output: (rows [R] long, packed allowed-token bitmask [R, ceil(vocab/32)] int32), or None
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """[NUM_COLUMNS, B] float32 on the device."""
        return to_device(self.host_rows, self.device)

    @property
    def temperature(self) -> torch.Tensor:  # [B] float32
        return self.rows[TEMPERATURE]

    @property
    def greedy(self) -> torch.Tensor:  # [B] bool
        return self.rows[GREEDY] > 0

    @property
    def top_k(self) -> torch.Tensor:  # [B] long, 0 = off
        return self.rows[TOP_K].long()

    @property
    def top_p(self) -> torch.Tensor:  # [B] float32
        return self.rows[TOP_P]

    @property
    def min_p(self) -> torch.Tensor:  # [B] float32
        return self.rows[MIN_P]

    @property
    def repetition_penalty(self) -> torch.Tensor:  # [B] float32
        return self.rows[REPETITION]

    @property
    def presence_penalty(self) -> torch.Tensor:  # [B] float32
        return self.rows[PRESENCE]

    @property
    def frequency_penalty(self) -> torch.Tensor:  # [B] float32
        return self.rows[FREQUENCY]

    @property
    def need_penalties(self) -> bool:
        return self.need_repetition or self.need_presence_frequency or self.blocked_ids is not None


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged id lists into (ids [B, L] long, mask [B, L] bool) without a per-token Python loop."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    ids[mask] = flat
    return to_device(ids, device), to_device(mask, device)


def _blocked(params: Sequence[SamplingParams], num_outputs: np.ndarray, min_tokens: np.ndarray,
             eos_token_ids: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    """Per row, the ids blocked while it has fewer than min_tokens outputs (None when no row has any)."""
    rows = np.flatnonzero(num_outputs < min_tokens)
    if not rows.size:
        return None
    blocked: list[tuple[int, ...]] = [()] * len(params)
    for i in rows.tolist():
        p = params[i]
        blocked[i] = p.stop_token_ids + (() if p.ignore_eos else eos_token_ids)
    return blocked if any(blocked) else None


def make_sampling_batch(
    params: list[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]],
    generators: list[torch.Generator | None],
    device: torch.device | str,
    eos_token_ids: tuple[int, ...] = (),
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_output_tokens: Sequence[int] | None = None,
) -> SamplingBatch:
    """Pure: per-row tensors and flags for one step. All lists have length B, row i = request i.

    ``eos_token_ids`` (optional) are blocked, with ``stop_token_ids``, while a row has fewer than
    ``min_tokens`` outputs (eos only unless ``ignore_eos``). Generators may live on any device.
    ``token_bitmask`` (rows, packed bitmask) from ``StructuredOutput.bitmask`` is moved to ``device``.
    ``num_output_tokens``: how many outputs each row has before this one (default: the lengths of
    ``output_token_ids``, which are then read only for the penalties: the engine passes empty lists when no
    row has one). Per-row values are gathered once into a numpy array; no tensor is made per row.
    """
    if not (len(output_token_ids) == len(prompt_token_ids) == len(generators) == len(params)):
        raise ValueError("params, output_token_ids, prompt_token_ids and generators must have equal lengths")
    device = torch.device(device)
    rows = np.array([p.sampling_row for p in params], dtype=np.float32).reshape(len(params), NUM_COLUMNS)
    sampled = rows[:, GREEDY] == 0
    need_rep = bool((rows[:, REPETITION] != 1.0).any())
    pres_freq = bool(((rows[:, PRESENCE] != 0.0) | (rows[:, FREQUENCY] != 0.0)).any())
    num_outputs = np.fromiter(map(len, output_token_ids), np.int64, len(params)) if num_output_tokens is None \
        else np.asarray(num_output_tokens, dtype=np.int64)
    blocked = _blocked(params, num_outputs, rows[:, MIN_TOKENS], eos_token_ids)
    return SamplingBatch(
        size=len(params),
        host_rows=torch.from_numpy(np.ascontiguousarray(rows.T)),
        device=device,
        output_ids=_pad(output_token_ids, device) if (need_rep or pres_freq) else None,
        prompt_ids=_pad(prompt_token_ids, device) if need_rep else None,
        blocked_ids=_pad(blocked, device) if blocked is not None else None,
        seeded=tuple((i, g) for i, g in enumerate(generators) if g is not None and sampled[i]),
        all_greedy=not sampled.any(),
        need_repetition=need_rep,
        need_presence_frequency=pres_freq,
        need_top_k=bool((rows[sampled, TOP_K] > 0).any()),
        need_top_p=bool((rows[sampled, TOP_P] < 1.0).any()),
        need_min_p=bool((rows[sampled, MIN_P] > 0.0).any()),
        num_top_logprobs=int(rows[:, LOGPROBS].max(initial=0)),
        need_logprobs=bool((rows[:, LOGPROBS] >= 0).any()),
        token_bitmask=None if token_bitmask is None else (to_device(token_bitmask[0], device),
                                                          to_device(token_bitmask[1], device)),
    )
