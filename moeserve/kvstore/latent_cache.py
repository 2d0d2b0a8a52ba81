"""Physical latent-cache tensors: per layer ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeserve.device_copy import to_device
from moeserve.errors import UserError


class CacheBudgetError(UserError, ValueError):
    """A latent-cache budget that holds not one block (the flags that set it are the user's to change)."""


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator, or None for the CPU (where the budget must be given)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "npu":  # pragma: no cover - needs torch_npu
        free, _total = torch.npu.mem_get_info(device)  # type: ignore[attr-defined]
        return int(free)
    return None


def empty_device_cache(device: torch.device) -> None:
    """Give the allocator's cached free blocks back to the device (after an engine closes), so that another
    engine or process can take them; nothing to do on the CPU."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    elif device.type == "npu":  # pragma: no cover - needs torch_npu
        torch.npu.empty_cache()  # type: ignore[attr-defined]


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many blocks fit in ``budget_bytes`` when one token costs ``bytes_per_token`` (all layers)."""
    if bytes_per_token <= 0:
        raise ValueError("bytes_per_token must be positive")
    return max(0, budget_bytes // (block_size * bytes_per_token))


def blocks_in_budget(budget_bytes: int, block_size: int, bytes_per_token: int,
                     source: str = "--kv-cache-memory") -> int:
    """``num_blocks_for_budget``, which must be at least 1: else CacheBudgetError naming where the budget
    came from (``source``) and the bytes one block takes."""
    num_blocks = num_blocks_for_budget(budget_bytes, block_size, bytes_per_token)
    if num_blocks < 1:
        need = block_size * bytes_per_token
        raise CacheBudgetError(f"{source} of {budget_bytes} bytes holds no cache block: one block of {block_size} "
                               f"tokens takes {need} bytes ({bytes_per_token} per token on the rank with the most "
                               f"layers); give --kv-cache-memory {need} or more")
    return num_blocks


def allocate_latent_caches(layer_ids: list[int], num_blocks: int, block_size: int, dim: int,
                           dtype: torch.dtype, device: torch.device) -> dict[int, torch.Tensor]:
    """layer id -> zeroed cache [num_blocks, block_size, dim]: views, in ``layer_ids`` order, of one tensor
    [layers, num_blocks, block_size, dim], so that moving blocks in or out of every layer is one op
    (``stacked_view``)."""
    whole = torch.zeros(len(layer_ids), num_blocks, block_size, dim, dtype=dtype, device=device)
    return {i: whole[j] for j, i in enumerate(layer_ids)}


def stacked_view(caches: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """[layers, num_blocks, block_size, dim] over ``caches`` (in order) where they are evenly spaced, disjoint views
    of one storage (``allocate_latent_caches``'), else None."""
    first = caches[0]
    size = first.numel() * first.element_size()
    step = caches[1].data_ptr() - first.data_ptr() if len(caches) > 1 else size
    if step < size or step % first.element_size() or not first.is_contiguous():
        return None
    for i, cache in enumerate(caches):
        if (cache.data_ptr() != first.data_ptr() + i * step or cache.shape != first.shape
                or cache.stride() != first.stride()
                or cache.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
    return first.as_strided((len(caches), *first.shape), (step // first.element_size(), *first.stride()))


def gather_blocks(caches: Sequence[torch.Tensor], stacked: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """Blocks ``idx`` of every layer -> a new tensor [n, layers, block_size, dim]."""
    if stacked is not None:
        return stacked.index_select(1, idx).transpose(0, 1).contiguous()
    return torch.stack([c.index_select(0, idx) for c in caches], dim=1)


def take_rows(data: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Rows ``rows`` of ``data`` (``data`` itself when they are all of its rows, in order)."""
    if list(rows) == list(range(len(data))):
        return data
    return data[to_device(torch.tensor(list(rows)), data.device)]


def scatter_blocks(caches: Sequence[torch.Tensor], stacked: torch.Tensor | None, idx: torch.Tensor,
                   data: torch.Tensor) -> None:
    """``data`` [n, layers, block_size, dim] into blocks ``idx`` of every layer."""
    if stacked is not None:
        stacked.index_copy_(1, idx, data.transpose(0, 1))
        return
    for j, cache in enumerate(caches):
        cache.index_copy_(0, idx, data[:, j])
