"""Building the KV connector from the engine's config -- the host tier and the shared store (the
coordinator's ``TierManager`` and each rank's ``BlockMover``, one process or stage workers), or a decode
instance's ``RemoteConnector`` -- and a prefill instance's transfer server."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from moeserve.kvstore.block_format import BlockLayout, model_fingerprint
from moeserve.kvstore.breaker import CircuitBreaker
from moeserve.kvstore.connector import KVConnector
from moeserve.kvstore.disagg import PrefillSide, RemoteConnector, block_server
from moeserve.kvstore.mover import BlockMover
from moeserve.kvstore.nixl_transfer import NixlAgent
from moeserve.kvstore.sharded_store import ShardedStore
from moeserve.kvstore.store import STORE_ENV, KVStore, MemoryStore, RedisStore, StoreConfigError, redact
from moeserve.kvstore.tiers import TierConfig, TierManager
from moeserve.kvstore.transfer_server import KvBlockServer

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor

logger = logging.getLogger(__name__)

FROM_ENV = f"env:{STORE_ENV}"  # what a stage worker's spec says when its URL is in that variable
AUTO_HOST_CAP = 2 << 30  # the automatic host tier: at most 2 GiB per rank ...
AUTO_HOST_RAM_FRACTION = 16  # ... and at most 1/16 of the machine's memory


def host_memory_bytes(config: Any) -> int:
    """``--kv-host-memory``: bytes of host memory per rank for the host tier (-1 = automatic, 0 = off).

    Automatic is off on CPU ranks: their latent cache already lives in host memory, so a host tier would hold
    a second copy of the same blocks in the same memory, and its write-through costs a copy of every computed
    block (6-120 ms of a 4,096-token prefill step on a 2-core Xeon, most of it faulting the pool's pages in;
    BENCHMARKS.md, issue 26). The memory is better given to ``--kv-cache-memory``; an explicit size still
    turns the tier on."""
    if config.kv_host_memory >= 0:
        return int(config.kv_host_memory)
    if not config.is_accelerator:
        return 0
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


def open_store(url: str, timeout_s: float = 1.0, probe_interval_s: float = 5.0,
               read_connections: int = 4) -> KVStore:
    """The store named by ``url``: ``redis://...`` (a server), ``memory://`` (this process only), or several
    servers' URLs separated by commas (keys spread over them, kvstore/sharded_store.py). Each server is checked
    at once (a wrong or missing password stops here)."""
    if "," in url:
        return ShardedStore([open_store(u, timeout_s, probe_interval_s, read_connections) for u in url.split(",")])
    if url.startswith("memory://"):
        return MemoryStore()
    store = RedisStore(url, timeout_s, CircuitBreaker(probe_interval_s=probe_interval_s), read_connections)
    store.check()
    return store


def open_kv_store(config: Any) -> KVStore | None:
    """The coordinator's store client, checked at start (a wrong or missing password stops here)."""
    if not config.kv_store:
        return None
    store = open_store(config.kv_store, config.kv_store_timeout, config.kv_store_probe_interval,
                       config.kv_store_connections)
    logger.info("KV store: %s", redact(config.kv_store))
    return store


def build_connector(config: Any, kv_dim: int, stage_layers: list[int], bytes_per_token: int, executor: Executor,
                    store: KVStore | None) -> KVConnector | None:
    """The engine's KV connector: a decode instance's ``RemoteConnector`` (every rank pulls its own layers),
    else the host tier and the store (``build_tiers``)."""
    if config.disaggregation_mode != "decode":
        return build_tiers(config, kv_dim, stage_layers, bytes_per_token, executor, store)
    layouts = stage_layouts(config, stage_layers, kv_dim)
    logger.info("decode instance: prompt blocks come from prefill instances (%s)", config.kv_transfer_backend)
    transport = executor.kv_transport(layouts[0], 0, None, read_threads=config.kv_store_connections,
                                      nixl=config.kv_transfer_backend == "nixl")
    return RemoteConnector(transport, layouts[0], config.kv_transfer_timeout, config.kv_transfer_backend)


def build_prefill_side(config: Any, kv_dim: int, stage_layers: list[int], executor: Executor) -> PrefillSide | None:
    """A prefill instance's transfer server (None for other roles), with the ranks' block servers as its
    sources (``Executor.kv_block_sources``)."""
    if config.disaggregation_mode != "prefill":
        return None
    layouts = stage_layouts(config, stage_layers, kv_dim)
    bind = any_port(config.kv_transfer_addr)
    block_bytes = sum(layout.payload_bytes for layout in layouts)
    sources = executor.kv_block_sources(layouts[0], config.kv_transfer_addr.rpartition(":")[0],
                                        config.kv_transfer_backend)
    side = PrefillSide(layouts[0], bind, config.kv_transfer_hold, block_bytes, sources)
    logger.info("prefill instance: KV transfer server at %s", side.address)
    return side


def any_port(addr: str) -> str:
    """``tcp://host:0`` -> ZeroMQ's any free port."""
    return addr[:-2] + ":*" if addr.endswith(":0") else addr


def build_tiers(config: Any, kv_dim: int, stage_layers: list[int], bytes_per_token: int, executor: Executor,
                store: KVStore | None) -> TierManager | None:
    """The coordinator's TierManager, or None when there is neither a host tier nor a store."""
    num_host = host_blocks(config, bytes_per_token)
    if not num_host and store is None:
        return None
    layouts = stage_layouts(config, stage_layers, kv_dim)
    tier_config = TierConfig(config.effective_block_size, num_host, layouts, config.kv_load_cost_rule,
                             config.kv_layerwise)
    logger.info("host tier: %d blocks (%d MiB per rank)%s", num_host,
                num_host * config.effective_block_size * bytes_per_token >> 20,
                "; shared store on" if store is not None else "")
    transport = executor.kv_transport(layouts[0], num_host, store, read_threads=config.kv_store_connections,
                                      write_buffer=config.kv_store_write_buffer)
    return TierManager(tier_config, transport, store)


def worker_options(config: Any, bytes_per_token: int) -> dict[str, Any]:
    """The WorkerSpec fields of the tiers (every rank the same)."""
    url = config.kv_store
    if url and url == os.environ.get(STORE_ENV):  # the ranks read it from the environment they inherit
        url = FROM_ENV
    return dict(kv_host_blocks=host_blocks(config, bytes_per_token), kv_store=url,
                kv_fingerprint=model_fingerprint(config.model_path, config.load_format, config.weights_seed),
                kv_salt=config.kv_store_salt, kv_store_timeout_s=config.kv_store_timeout,
                kv_store_probe_s=config.kv_store_probe_interval, kv_store_connections=config.kv_store_connections,
                kv_store_write_buffer=config.kv_store_write_buffer,
                disaggregation_mode=config.disaggregation_mode, kv_transfer_backend=config.kv_transfer_backend,
                kv_transfer_addr=config.kv_transfer_addr)


def worker_mover(spec: Any, caches: dict, kv_dim: int) -> BlockMover | None:
    """A stage worker's BlockMover (None when the tiers are off). Only tp rank 0 of a stage writes."""
    if not spec.kv_host_blocks and not spec.kv_store and spec.disaggregation_mode != "decode":
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
    store = open_store(url, spec.kv_store_timeout_s, spec.kv_store_probe_s, spec.kv_store_connections) \
        if url else None
    return BlockMover(caches, layout, spec.kv_host_blocks, store, writes=coord.tp_rank == 0,
                      read_threads=spec.kv_store_connections, write_queue_bytes=spec.kv_store_write_buffer)


def worker_nixl(spec: Any, mover: BlockMover) -> NixlAgent | None:
    """A decode rank's NIXL agent (the nixl backend), over its caches."""
    if spec.disaggregation_mode == "decode" and spec.kv_transfer_backend == "nixl":
        return NixlAgent(mover.caches, "decode")
    return None


def worker_block_server(spec: Any, caches: dict, kv_dim: int) -> KvBlockServer | None:
    """A prefill instance's stage worker serves its stage's layers of held blocks (tp rank 0 of each stage:
    every tp rank holds the same latent). It binds on the transfer address's host (one machine)."""
    coord = spec.dims.coord(spec.rank)
    if spec.disaggregation_mode != "prefill" or coord.tp_rank != 0:
        return None
    start = sum(spec.stage_layers[:coord.pp_stage])
    layout = BlockLayout(spec.kv_fingerprint, spec.dtype, spec.block_size, coord.pp_stage, start,
                         spec.stage_layers[coord.pp_stage], kv_dim, spec.kv_salt)
    host = spec.kv_transfer_addr.rpartition(":")[0]
    return block_server(caches, layout, f"{host}:*", spec.kv_transfer_backend)
