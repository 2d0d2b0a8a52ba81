"""Building the host tier and the shared store from the engine's config: the coordinator's ``TierManager``
and each rank's ``BlockMover`` (one process, or stage workers)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from moeserve.kvstore.block_format import BlockLayout, model_fingerprint
from moeserve.kvstore.mover import BlockMover
from moeserve.kvstore.store import STORE_ENV, KVStore, StoreConfigError, open_store, redact
from moeserve.kvstore.tiers import TierConfig, TierManager

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor

logger = logging.getLogger(__name__)

FROM_ENV = f"env:{STORE_ENV}"  # what a stage worker's spec says when its URL is in that variable
AUTO_HOST_CAP = 2 << 30  # the automatic host tier: at most 2 GiB per rank ...
AUTO_HOST_RAM_FRACTION = 16  # ... and at most 1/16 of the machine's memory


def host_memory_bytes(config: Any) -> int:
    """``--kv-host-memory``: bytes of host memory per rank for the host tier (-1 = automatic, 0 = off)."""
    if config.kv_host_memory >= 0:
        return int(config.kv_host_memory)
    import psutil

    return min(AUTO_HOST_CAP, psutil.virtual_memory().total // AUTO_HOST_RAM_FRACTION)


def host_blocks(config: Any, bytes_per_token: int) -> int:
    """Slots of the host pool (the same on every rank: sized by the rank holding the most layers)."""
    return host_memory_bytes(config) // (config.effective_block_size * bytes_per_token)


def dtype_name(config: Any) -> str:
    return str(config.torch_dtype).removeprefix("torch.")


def stage_layouts(config: Any, stage_layers: list[int], kv_dim: int) -> tuple[BlockLayout, ...]:
    fingerprint = model_fingerprint(config.model_path, config.load_format, config.weights_seed)
    layouts, start = [], 0
    for stage, n in enumerate(stage_layers):
        layouts.append(BlockLayout(fingerprint, dtype_name(config), config.effective_block_size, stage, start, n,
                                   kv_dim, config.kv_store_salt))
        start += n
    return tuple(layouts)


def open_kv_store(config: Any) -> KVStore | None:
    """The coordinator's store client, checked at start (a wrong or missing password stops here)."""
    if not config.kv_store:
        return None
    store = open_store(config.kv_store, config.kv_store_timeout, config.kv_store_probe_interval)
    logger.info("KV store: %s", redact(config.kv_store))
    return store


def build_tiers(config: Any, kv_dim: int, stage_layers: list[int], bytes_per_token: int, executor: Executor,
                store: KVStore | None) -> TierManager | None:
    """The coordinator's TierManager, or None when there is neither a host tier nor a store."""
    num_host = host_blocks(config, bytes_per_token)
    if not num_host and store is None:
        return None
    layouts = stage_layouts(config, stage_layers, kv_dim)
    tier_config = TierConfig(config.effective_block_size, num_host, layouts, config.kv_load_cost_rule)
    logger.info("host tier: %d blocks (%d MiB per rank)%s", num_host,
                num_host * config.effective_block_size * bytes_per_token >> 20,
                "; shared store on" if store is not None else "")
    return TierManager(tier_config, executor.kv_transport(layouts[0], num_host, store), store)


def worker_options(config: Any, bytes_per_token: int) -> dict[str, Any]:
    """The WorkerSpec fields of the tiers (every rank the same)."""
    url = config.kv_store
    if url and url == os.environ.get(STORE_ENV):  # the ranks read it from the environment they inherit
        url = FROM_ENV
    return dict(kv_host_blocks=host_blocks(config, bytes_per_token), kv_store=url,
                kv_fingerprint=model_fingerprint(config.model_path, config.load_format, config.weights_seed),
                kv_salt=config.kv_store_salt, kv_store_timeout_s=config.kv_store_timeout,
                kv_store_probe_s=config.kv_store_probe_interval)


def worker_mover(spec: Any, caches: dict, kv_dim: int) -> BlockMover | None:
    """A stage worker's BlockMover (None when the tiers are off). Only tp rank 0 of a stage writes."""
    if not spec.kv_host_blocks and not spec.kv_store:
        return None
    coord = spec.dims.coord(spec.rank)
    start = sum(spec.stage_layers[:coord.pp_stage])
    layout = BlockLayout(spec.kv_fingerprint, spec.dtype, spec.block_size, coord.pp_stage, start,
                         spec.stage_layers[coord.pp_stage], kv_dim, spec.kv_salt)
    url = spec.kv_store
    if url == FROM_ENV:
        url = os.environ.get(STORE_ENV, "")
        if not url:
            raise StoreConfigError(f"{STORE_ENV} is not set on node {spec.node}: every node needs the store's URL")
    store = open_store(url, spec.kv_store_timeout_s, spec.kv_store_probe_s) if url else None
    return BlockMover(caches, layout, spec.kv_host_blocks, store, writes=coord.tp_rank == 0)
