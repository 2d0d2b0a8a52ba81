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
from moeserve.kvstore.block_format import (
    BlockLayout,
    check_block,
    check_head,
    checksum_verdict,
    start_checksum,
)
from moeserve.kvstore.latent_cache import scatter_blocks, stacked_view
from moeserve.kvstore.load_spans import GroupsPassed, chunk_spans, homes, thread_spans
from moeserve.kvstore.store import KVStore

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # a chunk is about this many bytes of latent (at least one block)
# a layer-wise load reads the layers in this many groups (one slice of each value a group, the layers of a
# group contiguous in it): a read a layer cost 27 round trips a block for V2-Lite and parsed as many replies
# (0.7-0.8 GB/s over four servers on an H100 host, against 5 GB/s for whole values; seventeenth session)
LAYERWISE_READS = 4


@dataclass
class ChunkResult:
    num_ok: int  # blocks usable from the chunk's first
    nbytes: int
    num_corrupt: int


class StoreLoader:
    def __init__(self, caches: list[torch.Tensor], layout: BlockLayout, store: KVStore, num_threads: int,
                 staged: bool | None = None):
        """``staged``: values received into staging slots and copied to the caches (an accelerator's way; the
        default off the CPU), not into the cache rows themselves (a CPU's; tests run the other way on a CPU)."""
        self.caches = caches
        self.layout = layout
        self.store = store
        self.device = caches[0].device
        self._stacked = stacked_view(caches)
        self.staged = self.device.type != "cpu" if staged is None else staged
        self.accelerator = self.device.type != "cpu"
        per_block = layout.payload_bytes
        self.chunk_blocks = max(1, CHUNK_BYTES // per_block)
        self.num_threads = num_threads
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="kv-store-read",
                                        initializer=self._thread_init)
        # [num_blocks, block_size * kv_dim * itemsize] byte rows of each layer's cache (CPU: received into)
        self._rows = [c.view(torch.uint8).view(c.shape[0], -1).numpy() for c in caches] if not self.staged else []

    def _thread_init(self) -> None:
        if self.accelerator:  # NOTE: this thread's copies go on its own stream, beside the model's
            torch.accelerator.set_stream(torch.Stream(device=self.device))

    def load(self, hashes: Sequence[int], tokens: Sequence[Sequence[int]], blocks: Sequence[int]) -> ChunkResult:
        """Read blocks ``hashes`` into device ``blocks``; raises StoreError (nothing usable then)."""
        n = len(hashes)
        size = min(self.chunk_blocks, max(1, -(-n // self.num_threads)))
        spans = chunk_spans(homes(self.store, [self.layout.key(h) for h in hashes]), size)
        futures = [self._pool.submit(self._chunk, [hashes[i] for i in span], [tokens[i] for i in span],
                                     [blocks[i] for i in span]) for span in spans]
        wait(futures)  # NOTE: every chunk is done writing before an error is raised and the blocks are freed
        results = [f.result() for f in futures]
        num_ok = n  # the first position not loaded
        for span, r in zip(spans, results):
            if r.num_ok < len(span):
                num_ok = min(num_ok, span[r.num_ok])
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
        """``load``, a group of layers at a time (``LAYERWISE_READS`` groups). Each reading thread takes one span
        of the blocks (one server's keys, where there are threads enough) and reads its groups of layers in turn:
        the group's slice of every value of the span (``GETRANGE``; the header and token ids come with the first),
        one round trip a piece. ``on_layer(n)`` is called once every span has passed the group that ends at layer
        n; no span waits for the others between groups. Headers and checksums are checked at the end, over what
        landed: a step that ran over a block found unusable then is dropped by the coordinator. Raises StoreError
        when nothing at all could be read.

        Staged (an accelerator), a span's slices go through the reading thread's staging slot to the device, and
        each block's checksum is carried from layer to layer (``start_checksum``) instead of read back."""
        layout = self.layout
        keys = [layout.key(h) for h in hashes]
        heads = [bytearray(layout.head_bytes) for _ in hashes]
        digests: list = [None] * len(hashes)
        num_layers = len(self.caches)
        group = -(-num_layers // LAYERWISE_READS)
        bounds = [(j0, min(num_layers, j0 + group)) for j0 in range(0, num_layers, group)]
        spans = thread_spans(homes(self.store, keys), self.num_threads)
        passed = GroupsPassed(len(spans), [j1 for _, j1 in bounds], on_layer)
        futures = [self._pool.submit(self._span_layers, span, bounds, keys, heads, blocks, digests, passed)
                   for span in spans]
        wait(futures)  # NOTE: every span is done writing before an error is raised and the blocks are freed
        if not spans:
            on_layer(num_layers)
        num_ok, nbytes, error = len(hashes), 0, None
        for span, f in zip(spans, futures):
            span_ok, got, failed = f.result()
            nbytes += got
            error = error or failed
            if span_ok < len(span):
                num_ok = min(num_ok, span[span_ok])
        if error is not None and num_ok == 0:
            raise error
        for i in range(num_ok):
            if self.staged:
                why = check_head(heads[i], layout, hashes[i], tokens[i]) or checksum_verdict(heads[i], digests[i])
            else:
                why = check_block(heads[i], [rows[blocks[i]].data for rows in self._rows], layout, hashes[i],
                                  tokens[i])
            if why:
                logger.warning("stored block %s is not usable (%s): recomputing it", keys[i], why)
                return ChunkResult(i, nbytes, 1)
        return ChunkResult(num_ok, nbytes, 0)

    def _span_layers(self, span: Sequence[int], bounds: Sequence[tuple[int, int]], keys: Sequence[str],
                     heads: Sequence[bytearray], blocks: Sequence[int], digests: list,
                     passed: GroupsPassed) -> tuple[int, int, BaseException | None]:
        """One reading thread's span (positions of the load) through every group of layers ``bounds``: (how many
        of its blocks, from its first, hold every layer, bytes read, the error that ended it). Each group it has
        passed, or given up on, is told to ``passed``."""
        layer_bytes = self.layout.payload_bytes // len(self.caches)
        ok, nbytes, next_group = len(span), 0, 0
        try:
            for g, (j0, j1) in enumerate(bounds):
                if ok:
                    part = span[:ok]
                    start = 0 if j0 == 0 else self.layout.head_bytes + j0 * layer_bytes
                    want = (j1 - j0) * layer_bytes + (self.layout.head_bytes if j0 == 0 else 0)
                    lengths, part_digests = self._read_span(
                        j0, j1, start, want, [keys[i] for i in part], [heads[i] for i in part],
                        [blocks[i] for i in part], [digests[i] for i in part] if self.staged else [])
                    for i, digest in zip(part, part_digests):
                        digests[i] = digest
                    nbytes += sum(lengths)
                    ok = next((k for k, got in enumerate(lengths) if got < want), ok)  # missing, or cut short
                next_group = g + 1
                passed.add(g)
        except BaseException as e:  # noqa: BLE001 - raised by the caller once every span has stopped writing
            for g in range(next_group, len(bounds)):
                passed.add(g)
            return 0, nbytes, e
        return ok, nbytes, None

    def _read_span(self, j0: int, j1: int, start: int, want: int, keys: Sequence[str], heads: Sequence[bytearray],
                   blocks: Sequence[int], digests: list) -> tuple[list[int], list]:
        """Layers [j0, j1)'s slice of a span of blocks (one round trip a piece) -> (each block's bytes read, the
        span's checksums carried on, staged only). On a CPU straight into the cache rows; staged, in pieces that
        fit this thread's slot, each piece to the device as it is in, its checksums updated with its slices."""
        first = [memoryview(heads[i]) for i in range(len(keys))] if j0 == 0 else []
        if not self.staged:
            dests = [([first[i]] if first else []) + [self._rows[j][b].data for j in range(j0, j1)]
                     for i, b in enumerate(blocks)]
            return self.store.read_ranges_into([(k, start) for k in keys], dests), []
        slice_bytes = want - (self.layout.head_bytes if j0 == 0 else 0)
        cap = max(1, self.chunk_blocks * self.layout.payload_bytes // slice_bytes)
        lengths: list[int] = []
        for lo in range(0, len(keys), cap):
            k = min(cap, len(keys) - lo)
            staging = self._staging(self.chunk_blocks).view(-1)[:k * slice_bytes].view(k, slice_bytes)
            rows = [staging[i].numpy().data for i in range(k)]
            dests = [[first[lo + i], rows[i]] if first else [rows[i]] for i in range(k)]
            got = self.store.read_ranges_into([(key, start) for key in keys[lo:lo + k]], dests)
            lengths.extend(got)
            ok = next((i for i, g in enumerate(got) if g < want), k)
            for i in range(ok):
                if j0 == 0:
                    digests[lo + i] = start_checksum(heads[lo + i])
                digests[lo + i].update(rows[i])
            if ok:
                self._layers_to_device(j0, j1, staging[:ok], blocks[lo:lo + ok])
            if ok < k:  # the prefix ends in this piece: the rest of the span is not needed
                lengths.extend([0] * (len(keys) - len(lengths)))
                break
        return lengths, digests

    def _staging(self, k: int) -> torch.Tensor:
        """This thread's slot (pinned on an accelerator), as [k, L * block_size * kv_dim * itemsize] bytes."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = torch.empty((self.chunk_blocks, self.layout.payload_bytes), dtype=torch.uint8,
                                                  pin_memory=self.accelerator)
        return slot[:k]

    def _layers_to_device(self, j0: int, j1: int, staged: torch.Tensor, blocks: Sequence[int]) -> None:
        """Layers [j0, j1)'s slices of ``blocks`` ([k, (j1 - j0) * block_size * kv_dim * itemsize] bytes) into
        their caches, one copy to the device; waits for it (the slot is reused next, and the layers are announced
        after)."""
        data = staged.to(self.device, non_blocking=True).view(len(blocks), j1 - j0, -1)
        index = to_device(torch.tensor(list(blocks)), self.device)
        for j in range(j0, j1):
            cache = self.caches[j]
            cache.index_copy_(0, index, data[:, j - j0].view(cache.dtype).unflatten(1, cache.shape[1:]))
        self._wait_copies()

    def _wait_copies(self) -> None:
        if self.accelerator:
            done = torch.Event(device=self.device)
            done.record()
            done.synchronize()

    def _to_device(self, staged: torch.Tensor, blocks: Sequence[int]) -> None:
        """One asynchronous copy of the chunk, then into the cache (one op for every layer where the caches are
        one tensor: each op lets go of the GIL, and a busy engine loop makes taking it back slow); waits for it
        (the slot is reused by this thread's next chunk, and the load is reported done after)."""
        first = self.caches[0]
        data = staged.to(self.device, non_blocking=True).view(first.dtype).view(
            len(blocks), len(self.caches), *first.shape[1:])
        scatter_blocks(self.caches, self._stacked, to_device(torch.tensor(list(blocks)), self.device), data)
        self._wait_copies()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

