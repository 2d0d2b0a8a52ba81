"""Expert-load counters of one rank: routed (token, expert) pairs per MoE layer, per logical expert and per
physical slot, prefill and decode apart, in preallocated device buffers.

A MoE layer calls ``count_routed`` once per forward with its top-k ids. Counting is tensor ops on fixed
buffers (``index_add_``): no host synchronisation, nothing allocated whose size depends on the data, so it
can sit inside a captured CUDA graph. Every rank counts only its own share of a step's tokens (the share
``ep_dispatch.token_shares`` gives it), so the sum over the ranks of a stage is each token counted once --
whether the rank routed every token (the all-reduce path) or only its share (the all-to-all path).

Physical slots are numbered ``ep_rank * slots_per_rank + slot`` over the layer's EP group; a pair goes to
the copy the layer's ``ExpertMap`` picks, as the forward does (each layer has its own placement). With no EP placement (one rank, or
tensor-parallel experts) the physical slot of an expert is its logical id.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moeserve.experts.ep_dispatch import token_shares
from moeserve.experts.expert_map import ExpertMap, ExpertPlacement
from moeserve.kernels import kernels_apply

PREFILL, DECODE = 0, 1
PHASES = ("prefill", "decode")


class ExpertLoadCounter:
    """Counters of one rank's MoE layers (``layer_ids``, global layer numbers).

    ``logical``: [layers, 2 (prefill, decode), num_logical]; ``physical``: [layers, 2, num_physical];
    int64 on ``device``, cumulative since start (readers take differences)."""

    def __init__(self, layer_ids: Iterable[int], num_logical: int, device: torch.device,
                 phy2log: torch.Tensor | None = None, share_rank: int = 0, share_size: int = 1,
                 fused: bool = False, maps: dict[int, ExpertMap] | None = None):
        """``maps``: each layer's ``ExpertMap`` (the layer's own, read at each count), or ``phy2log``:
        [ep, slots_per_rank] one placement for every layer; neither: physical = logical (``physical`` is
        then the same tensor as ``logical``, counted once). ``share_rank`` / ``share_size``: this rank's
        place among the ranks that see the same tokens. ``fused``: count with one kernel per layer
        (``kernels/expert_count.py``) instead of the eager ops."""
        self.layer_ids = tuple(layer_ids)
        self.index = {layer_id: i for i, layer_id in enumerate(self.layer_ids)}
        self.num_logical = num_logical
        self.device = device
        self.share_rank, self.share_size = share_rank, share_size
        self.fused = fused
        if maps is None and phy2log is not None:
            placement = ExpertPlacement.from_ranks(phy2log.tolist(), 0, num_logical)
            maps = {layer_id: ExpertMap(placement).to(device) for layer_id in self.layer_ids}
        self.maps = maps if maps and all(m.is_whole for m in maps.values()) else None
        self.has_placement = self.maps is not None  # fixed for the counter's life (EPLB moves slots, not this)
        # the first tokens of the step are its decode tokens: a device scalar, so that a captured CUDA graph
        # reads the value of each replay (``begin_step`` writes it before the graph runs)
        self.num_decode_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.logical = torch.zeros(len(self.layer_ids), 2, num_logical, dtype=torch.long, device=device)
        if self.maps is None:
            self.physical = self.logical
        else:
            first = self.maps[self.layer_ids[0]]
            assert first.holders is not None
            num_physical = first.num_local * int(first.holders.shape[1])
            self.physical = torch.zeros(len(self.layer_ids), 2, num_physical, dtype=torch.long, device=device)

    def placement_changed(self, layer_id: int) -> None:
        """Layer ``layer_id`` has a new placement (its ``ExpertMap`` is updated): its physical counts start
        again from zero (the slots mean other experts)."""
        if self.maps is not None:
            self.physical[self.index[layer_id]].zero_()

    @property
    def num_physical(self) -> int:
        return int(self.physical.shape[-1])

    def begin_step(self, num_decode_tokens: int) -> None:
        self.num_decode_tokens.fill_(num_decode_tokens)

    def share(self, num_tokens: int) -> tuple[int, int]:
        """(first token, number of tokens) of this rank's share of a step of ``num_tokens``."""
        counts = token_shares(num_tokens, self.share_size)
        return sum(counts[:self.share_rank]), counts[self.share_rank]

    def count(self, layer_id: int, ids: torch.Tensor, first_token: int, weights: torch.Tensor | None = None) -> None:
        """ids: [N, top_k] logical experts of the step's tokens ``first_token ..`` (this rank's share);
        ``weights``: [N] 1 for a real token, 0 for padding (a CUDA graph's), None: all real."""
        if ids.numel() == 0:
            return
        layer = self.index[layer_id]
        slot = None if self.maps is None else self.maps[layer_id].physical_slots(ids, first_token)  # [N, top_k]
        if self.fused:
            from moeserve.kernels.expert_count import count_pairs  # Triton: imported only where it runs

            count_pairs(self.logical, None if slot is None else self.physical, layer, ids, slot, first_token,
                        self.num_decode_tokens, weights)
            return
        token = torch.arange(first_token, first_token + ids.shape[0], device=ids.device)
        phase = torch.where(token < self.num_decode_tokens, DECODE, PREFILL).unsqueeze(1)  # [N, 1]
        ones = torch.ones(ids.numel(), dtype=torch.long, device=ids.device) if weights is None else \
            weights.to(torch.long).unsqueeze(1).expand_as(ids).flatten()
        num_logical = self.num_logical
        self.logical.view(-1).index_add_(0, ((layer * 2 + phase) * num_logical + ids).flatten(), ones)
        if slot is None:  # physical is logical
            return
        num_physical = self.num_physical
        self.physical.view(-1).index_add_(0, ((layer * 2 + phase) * num_physical + slot).flatten(), ones)

    def router_target(self, layer_id: int, num_tokens: int, weights: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int] | None:
        """What the router kernel needs to count a step of ``num_tokens`` itself (``kernels/router.py``'s
        ``count``), or None where the pairs must be counted here: eager counting, or an EP placement (the
        physical slot of a pair needs the whole placement)."""
        if not self.fused or self.has_placement:
            return None
        first, n = self.share(num_tokens)
        return self.logical[self.index[layer_id]], self.num_decode_tokens, weights, first, first + n

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logical, physical) cumulative counts, copied to the host (waits for the device: call it
        between steps, every few steps, not inside one)."""
        return self.logical.cpu(), self.physical.cpu()


def count_routed(counter: ExpertLoadCounter | None, layer_id: int, ids: torch.Tensor,
                 first_token: int | None = None, weights: torch.Tensor | None = None) -> None:
    """The one call a MoE forward makes. ``ids``: [T, top_k] for every token of the step
    (``first_token`` None: the counter takes this rank's share) or for a share starting at ``first_token``;
    ``weights``: [>= T] 0 for padding rows (``MoE.count_weights``), None: every row is a token."""
    if counter is None:
        return
    if first_token is None:
        first_token, n = counter.share(ids.shape[0])
        ids = ids[first_token:first_token + n]
        weights = None if weights is None else weights[first_token:first_token + n]
    counter.count(layer_id, ids, first_token, weights)


def attach_counter(model, device: torch.device) -> ExpertLoadCounter | None:
    """Build one counter for a model slice's MoE layers and hand it to each of them (None without any)."""
    moe_layers = model.moe_layers()
    if not moe_layers:
        return None
    first = next(iter(moe_layers.values()))
    shard = model.slice.tp
    maps = {layer_id: moe.expert_map for layer_id, moe in moe_layers.items()}
    counter = ExpertLoadCounter(moe_layers, first.expert_map.num_logical, device, None, shard.rank, shard.size,
                                fused=kernels_apply(device), maps=maps)
    for layer_id, moe in moe_layers.items():
        moe.load_counter, moe.layer_id = counter, layer_id
    return counter
