"""No-cache attention metadata and the token windows for training, evaluation and verification."""

from __future__ import annotations

import numpy as np
import torch

from moeserve.model.attn_metadata import build_attn_metadata


def causal_meta(batch: int, seq_len: int, device: torch.device):
    """No-cache metadata: B independent sequences of L tokens, flattened to T = B * L."""
    return build_attn_metadata(
        block_tables=torch.arange(batch, device=device)[:, None],
        num_computed=torch.zeros(batch, dtype=torch.long, device=device),
        query_lens=torch.full((batch,), seq_len, dtype=torch.long, device=device),
        block_size=seq_len)


class Batcher:
    """Random windows of seq_len + 1 tokens from one token stream; deterministic per seed."""

    def __init__(self, stream: np.ndarray, seq_len: int, device: torch.device, seed: int,
                 bos_fraction: float = 0.25):
        self.data = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.seq_len = seq_len
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.max_start = len(stream) - seq_len - 1
        if self.max_start <= 0:
            raise SystemExit(f"token stream of {len(stream)} tokens is shorter than --seq-len + 1")
        starts = np.flatnonzero(stream == 0)
        self.doc_starts = torch.from_numpy(starts[starts <= self.max_start].astype(np.int64))
        self.bos_fraction = bos_fraction
        self.span = torch.arange(seq_len + 1, device=device)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.max_start + 1, (batch,), generator=self.gen)
        at_doc = torch.rand(batch, generator=self.gen) < self.bos_fraction
        if len(self.doc_starts):
            pick = self.doc_starts[torch.randint(0, len(self.doc_starts), (batch,), generator=self.gen)]
            starts = torch.where(at_doc, pick, starts)
        return self.windows(starts)

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.data[starts.to(self.device)[:, None] + self.span]  # [B, L + 1]
        return w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)


def fixed_eval_starts(stream_len: int, seq_len: int, num: int, seed: int) -> torch.Tensor:
    """Evaluation windows: non-overlapping, evenly spread when the stream is long enough."""
    max_start = stream_len - seq_len - 1
    if (max_start + 1) // seq_len >= num:
        return (torch.arange(num) * ((max_start + 1) // num)).long()
    return torch.randint(0, max_start + 1, (num,), generator=torch.Generator().manual_seed(seed))
