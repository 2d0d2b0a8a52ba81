"""Loading stored blocks into a rank's cache: the load is split into chunks read in parallel over the
store's connection pool, each value received straight into where it goes, and checked there.

- On a CPU the destination is the cache itself: layer j of block b is received into ``cache_j[b]`` (the
  stored value is layer-major, so each layer's slice is one contiguous row). No staging, no copy but the
  socket's.
- On an accelerator each reading thread has a pinned staging slot ``[chunk, L, block_size, kv_dim]``; a
  chunk goes to the device in one asynchronous copy on the thread's own stream as soon as it is in and
  checked, then into the cache blocks (one op for every layer), while the other threads receive the next chunks.

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
from moeserve.kvstore.block_format import BlockLayout, check_block
from moeserve.kvstore.latent_cache import scatter_blocks, stacked_view
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
        self._stacked = stacked_view(caches)
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
        """``load``, layer by layer: for each layer in turn, its slice of every value (``GETRANGE``; the header
        and token ids come with layer 0) is read in spans over the connection pool, in parallel, one round trip
        each, and ``on_layer(j + 1)`` is called once layer j of every block is in. Headers and checksums are
        checked at the end, over what landed: a step that ran over a block found unusable then is dropped by the
        coordinator. Raises StoreError when nothing at all could be read.

        On an accelerator the values are read whole (``load``) and every layer is announced at the end."""
        if self.staged:
            result = self.load(hashes, tokens, blocks)
            on_layer(len(self.caches))
            return result
        layout = self.layout
        keys = [layout.key(h) for h in hashes]
        heads = [bytearray(layout.head_bytes) for _ in hashes]
        num_ok, nbytes, error = len(hashes), 0, None
        for j in range(len(self.caches)):
            num_ok, got, failed = self._read_layer(j, keys, heads, blocks[:num_ok])
            nbytes += got
            error = error or failed
            on_layer(j + 1)
        if error is not None and num_ok == 0:
            raise error
        for i in range(num_ok):
            why = check_block(heads[i], [rows[blocks[i]].data for rows in self._rows], layout, hashes[i], tokens[i])
            if why:
                logger.warning("stored block %s is not usable (%s): recomputing it", keys[i], why)
                return ChunkResult(i, nbytes, 1)
        return ChunkResult(num_ok, nbytes, 0)

    def _read_layer(self, j: int, keys: Sequence[str], heads: Sequence[bytearray],
                    blocks: Sequence[int]) -> tuple[int, int, BaseException | None]:
        """Layer j of ``blocks`` (the first ``len(blocks)`` of the load) into the cache: (how many blocks, from
        the first, it holds in full, bytes read, the first error)."""
        n, rows = len(blocks), self._rows[j]
        start = 0 if j == 0 else self.layout.head_bytes + j * (self.layout.payload_bytes // len(self.caches))
        dests = [[memoryview(heads[i]), rows[b].data] if j == 0 else [rows[b].data] for i, b in enumerate(blocks)]
        size = max(1, -(-n // self.num_threads))
        spans = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
        futures = [self._pool.submit(self.store.read_ranges_into, [(k, start) for k in keys[lo:hi]], dests[lo:hi])
                   for lo, hi in spans]
        wait(futures)  # NOTE: every span is done writing before an error is raised and the blocks are freed
        num_ok, nbytes, error = n, 0, None
        for (lo, _), f in zip(spans, futures):
            if f.exception() is not None:
                error = error or f.exception()
                num_ok = min(num_ok, lo)
                continue
            for i, got in enumerate(f.result(), start=lo):
                nbytes += got
                if got < sum(len(p) for p in dests[i]):
                    num_ok = min(num_ok, i)  # missing, or cut short, from this layer on
        return num_ok, nbytes, error

    def _staging(self, k: int) -> torch.Tensor:
        """This thread's pinned slot, as [k, L * block_size * kv_dim * itemsize] bytes."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = torch.empty((self.chunk_blocks, self.layout.payload_bytes), dtype=torch.uint8,
                                                  pin_memory=True)
        return slot[:k]

    def _to_device(self, staged: torch.Tensor, blocks: Sequence[int]) -> None:
        """One asynchronous copy of the chunk, then into the cache (one op for every layer where the caches are
        one tensor: each op lets go of the GIL, and a busy engine loop makes taking it back slow); waits for it
        (the slot is reused by this thread's next chunk, and the load is reported done after)."""
        first = self.caches[0]
        data = staged.to(self.device, non_blocking=True).view(first.dtype).view(
            len(blocks), len(self.caches), *first.shape[1:])
        scatter_blocks(self.caches, self._stacked, to_device(torch.tensor(list(blocks)), self.device), data)
        done = torch.Event(device=self.device)
        done.record()
        done.synchronize()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

