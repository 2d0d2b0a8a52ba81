"""Loading stored blocks into a rank's cache: the load is split into chunks read in parallel over the
store's connection pool, each value received straight into where it goes, and checked there.

- On a CPU the destination is the cache itself: layer j of block b is received into ``cache_j[b]`` (the
  stored value is layer-major, so each layer's slice is one contiguous row). No staging, no copy but the
  socket's.
- On an accelerator each reading thread has a pinned staging slot ``[chunk, L, block_size, kv_dim]``; a
  chunk goes to the device in one asynchronous copy on the thread's own stream as soon as it is in and
  checked, then into the cache blocks layer by layer, while the other threads receive the next chunks.

A block is usable when its header, token ids and checksum match (block_format.check_block); the load reports
the blocks usable from the first. A block received but not usable was written into a block that is freshly
allocated and not yet registered: the engine frees it and computes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from moeserve.device_copy import to_device
from moeserve.kvstore.block_format import BlockLayout, check_block, check_head
from moeserve.kvstore.store import KVStore

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # a chunk is about this many bytes of latent (at least one block)


@dataclass
class ChunkResult:
    num_ok: int  # blocks usable from the chunk's first
    nbytes: int
    num_corrupt: int


class StoreLoader:
    def __init__(self, caches: list[torch.Tensor], layout: BlockLayout, store: KVStore, num_threads: int):
        self.caches = caches
        self.layout = layout
        self.store = store
        self.device = caches[0].device
        self.staged = self.device.type != "cpu"
        per_block = layout.payload_bytes
        self.chunk_blocks = max(1, CHUNK_BYTES // per_block)
        self.num_threads = num_threads
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="kv-store-read",
                                        initializer=self._thread_init)
        # [num_blocks, block_size * kv_dim * itemsize] byte rows of each layer's cache (CPU: received into)
        self._rows = [c.view(torch.uint8).view(c.shape[0], -1).numpy() for c in caches] if not self.staged else []

    def _thread_init(self) -> None:
        if self.staged:  # NOTE: this thread's copies go on its own stream, beside the model's
            torch.accelerator.set_stream(torch.Stream(device=self.device))

    def load(self, hashes: Sequence[int], tokens: Sequence[Sequence[int]], blocks: Sequence[int]) -> ChunkResult:
        """Read blocks ``hashes`` into device ``blocks``; raises StoreError (nothing usable then)."""
        n = len(hashes)
        size = min(self.chunk_blocks, max(1, -(-n // self.num_threads)))
        spans = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
        futures = [self._pool.submit(self._chunk, hashes[lo:hi], tokens[lo:hi], blocks[lo:hi]) for lo, hi in spans]
        wait(futures)  # NOTE: every chunk is done writing before an error is raised and the blocks are freed
        results = [f.result() for f in futures]
        num_ok = n
        for (lo, hi), r in zip(spans, results):
            if r.num_ok < hi - lo:
                num_ok = min(num_ok, lo + r.num_ok)
        return ChunkResult(num_ok, sum(r.nbytes for r in results), sum(r.num_corrupt for r in results))

    def _chunk(self, hashes: Sequence[int], tokens: Sequence[Sequence[int]], blocks: Sequence[int]) -> ChunkResult:
        layout, k = self.layout, len(hashes)
        heads = [bytearray(layout.head_bytes) for _ in range(k)]
        staging = self._staging(k) if self.staged else None
        if staging is not None:
            payloads = [[staging[i].numpy().data] for i in range(k)]
        else:
            payloads = [[rows[b].data for rows in self._rows] for b in blocks]
        lengths = self.store.read_into([layout.key(h) for h in hashes],
                                       [[memoryview(h), *p] for h, p in zip(heads, payloads)])
        num_ok, corrupt = k, 0
        for i in range(k):
            why = "missing" if lengths[i] < 0 else check_block(heads[i], payloads[i], layout, hashes[i], tokens[i])
            if why:
                if lengths[i] >= 0:
                    corrupt = 1
                    logger.warning("stored block %s is not usable (%s): recomputing it", layout.key(hashes[i]), why)
                num_ok = i
                break
        if staging is not None and num_ok:
            self._to_device(staging[:num_ok], blocks[:num_ok])
        return ChunkResult(num_ok, sum(n for n in lengths if n > 0), corrupt)

    def load_layers(self, hashes: Sequence[int], tokens: Sequence[Sequence[int]], blocks: Sequence[int],
                    on_layer: Callable[[int], None]) -> ChunkResult:
        """``load``, layer by layer: every span of blocks (one per reading thread) is read one layer at a time
        (``GETRANGE`` of that layer's slice of each value, the header with layer 0), and ``on_layer(j + 1)`` is
        called once layer j of every block is in. The checksums are checked at the end, over what landed: a
        step that ran over layers of a block found unusable then is dropped by the coordinator.

        On an accelerator the values are read whole (``load``) and every layer is announced at the end."""
        if self.staged:
            result = self.load(hashes, tokens, blocks)
            on_layer(len(self.caches))
            return result
        n = len(hashes)
        size = max(1, -(-n // self.num_threads))
        spans = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
        progress = _LayerProgress(len(spans), on_layer)
        futures = [self._pool.submit(self._span_layers, hashes[lo:hi], tokens[lo:hi], blocks[lo:hi], progress)
                   for lo, hi in spans]
        wait(futures)  # NOTE: every span is done writing before an error is raised and the blocks are freed
        results = [f.result() for f in futures]
        num_ok = n
        for (lo, hi), r in zip(spans, results):
            if r.num_ok < hi - lo:
                num_ok = min(num_ok, lo + r.num_ok)
        return ChunkResult(num_ok, sum(r.nbytes for r in results), sum(r.num_corrupt for r in results))

    def _span_layers(self, hashes: Sequence[int], tokens: Sequence[Sequence[int]], blocks: Sequence[int],
                     progress: _LayerProgress) -> ChunkResult:
        layout, k = self.layout, len(hashes)
        keys = [layout.key(h) for h in hashes]
        heads = [bytearray(layout.head_bytes) for _ in range(k)]
        row_bytes = layout.payload_bytes // len(self.caches)
        num_ok, nbytes, corrupt = k, 0, 0
        for j, rows in enumerate(self._rows):
            dests = [[memoryview(heads[i]), rows[b].data] if j == 0 else [rows[b].data]
                     for i, b in enumerate(blocks[:num_ok])]
            start = 0 if j == 0 else layout.head_bytes + j * row_bytes
            lengths = self.store.read_range_into(keys[:num_ok], start, dests)
            nbytes += sum(lengths)
            for i, got in enumerate(lengths):
                why = "missing" if got < sum(len(p) for p in dests[i]) else \
                    check_head(heads[i], layout, hashes[i], tokens[i]) if j == 0 else ""
                if why:
                    corrupt = int(got > 0)
                    if got > 0:
                        logger.warning("stored block %s is not usable (%s): recomputing it", keys[i], why)
                    num_ok = i
                    break
            progress.done(j)
        for i in range(num_ok):
            why = check_block(heads[i], [rows[blocks[i]].data for rows in self._rows], layout, hashes[i], tokens[i])
            if why:
                logger.warning("stored block %s is not usable (%s): recomputing it", keys[i], why)
                return ChunkResult(i, nbytes, 1)
        return ChunkResult(num_ok, nbytes, corrupt)

    def _staging(self, k: int) -> torch.Tensor:
        """This thread's pinned slot, as [k, L * block_size * kv_dim * itemsize] bytes."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = torch.empty((self.chunk_blocks, self.layout.payload_bytes), dtype=torch.uint8,
                                                  pin_memory=True)
        return slot[:k]

    def _to_device(self, staged: torch.Tensor, blocks: Sequence[int]) -> None:
        """One asynchronous copy of the chunk, then layer by layer into the cache; waits for it (the slot is
        reused by this thread's next chunk, and the load is reported done after)."""
        first = self.caches[0]
        data = staged.to(self.device, non_blocking=True).view(first.dtype).view(
            len(blocks), len(self.caches), *first.shape[1:])
        idx = to_device(torch.tensor(list(blocks)), self.device)
        for j, cache in enumerate(self.caches):
            cache.index_copy_(0, idx, data[:, j])
        done = torch.Event(device=self.device)
        done.record()
        done.synchronize()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _LayerProgress:
    """Layers done per span of a layer-wise load; ``on_layer(j + 1)`` once every span has done layer j."""

    def __init__(self, num_spans: int, on_layer: Callable[[int], None]):
        self.num_spans = num_spans
        self.on_layer = on_layer
        self._lock = threading.Lock()
        self._count: dict[int, int] = {}

    def done(self, layer: int) -> None:
        with self._lock:
            self._count[layer] = self._count.get(layer, 0) + 1
            complete = self._count[layer] == self.num_spans
        if complete:  # NOTE: a span does its layers in order, so layer j completes after every layer before it
            self.on_layer(layer + 1)
