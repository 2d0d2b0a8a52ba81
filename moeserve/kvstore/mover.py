"""BlockMover: the rank's side of the host tier and the shared store (it owns tensors; the coordinator's
``TierManager`` owns every decision, and says which block goes where).

- ``save``: copy computed device blocks into host-pool slots, and (on the rank that writes for its stage, tp
  rank 0) queue them for the store. The store queue is bounded: when full, the blocks are dropped (counted),
  so that a slow store never slows a step (256 MiB of blocks by default). A background thread encodes and writes them.
- ``load_host``: copy host-pool slots into device blocks; ``load_store``: read stored blocks into device
  blocks (kvstore/store_load.py: chunks in parallel, received in place). Reports how many stored blocks, from the first, it loaded:
  a missing, corrupt or timed-out block ends the prefix there (the coordinator recomputes the rest).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.device_copy import to_device
from moeserve.kvstore.block_format import BlockLayout, encode_block_into
from moeserve.kvstore.latent_cache import gather_blocks, scatter_blocks, stacked_view
from moeserve.kvstore.store import WRITE_BUFFER_BYTES, KVStore, StoreError
from moeserve.kvstore.store_load import StoreLoader

logger = logging.getLogger(__name__)

HOST_LOAD_CHUNK = 64  # blocks staged on the device at a time by a host-tier load (128 MiB of V2-Lite's)


def copy_runs(rows: Sequence[int], slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """The pairs ``rows[k] -> slots[k]`` as runs consecutive in both: (first row, first slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in zip(rows, slots):
        if runs and row == runs[-1][0] + runs[-1][2] and slot == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((row, slot, 1))
    return runs


@dataclass
class LoadReport:
    num_store_loaded: int  # stored (or remote) blocks loaded, from the first
    bytes_read: int
    num_corrupt: int
    error: str = ""  # why blocks asked for did not come


@dataclass
class MoverCounters:
    writes_dropped: int = 0  # blocks not written because the queue was full
    blocks_written: int = 0
    corrupt_blocks: int = 0


class BlockMover:
    def __init__(self, caches: dict[int, torch.Tensor], layout: BlockLayout, host_blocks: int,
                 store: KVStore | None, writes: bool = True, write_queue_bytes: int = WRITE_BUFFER_BYTES,
                 read_threads: int = 4):
        """``caches``: layer id -> [num_blocks, block_size, kv_dim] (this rank's); ``layout``: this stage's
        stored form; ``writes``: whether this rank writes its stage's blocks to the store; ``read_threads``:
        the chunks of a store load read in parallel (kvstore/store_load.py)."""
        self.layers = sorted(caches)
        self.caches = [caches[i] for i in self.layers]
        first = self.caches[0]
        self._stacked = stacked_view(self.caches)  # every layer's blocks moved in one op, where the caches allow
        self.device = first.device
        self.layout = layout
        self.store = store
        self.writes = writes and store is not None
        self.pin = self.device.type != "cpu"  # pinned host memory: asynchronous copies to and from the device
        self.block_shape = (len(self.layers), *first.shape[1:])
        self.host = torch.empty((host_blocks, *self.block_shape), dtype=first.dtype, pin_memory=self.pin) \
            if host_blocks else None
        self.counters = MoverCounters()
        # saves copy blocks to the host on this stream, beside the steps' (``_copy_out``)
        self._copy_stream = torch.Stream(device=self.device) if self.pin else None
        self.loader = StoreLoader(self.caches, layout, store, read_threads) if store is not None else None
        self.max_pending = max(1, write_queue_bytes // layout.payload_bytes)  # blocks waiting to be written
        self._pending = 0
        # NOTE: the blocks waiting to be written sit in slots allocated once, each laid out as the block's stored
        # value (header, token ids, latent): the writer thread encodes a slot in place and the store sends it as
        # it is. A copy of the latent there held the GIL for about a millisecond a block, and the thread that runs
        # the steps waited for it (bench_kvstore_writes.py). On an accelerator the slots are pinned: the copies into
        # them are asynchronous, and a pinned allocation on the step's path (cudaHostAlloc) costs milliseconds
        self._write_slots = torch.empty((self.max_pending, layout.value_bytes), dtype=torch.uint8,
                                        pin_memory=self.pin) if self.writes else None
        # taken from the end, given back reversed: a save's slots come in ascending runs (``copy_runs``)
        self._free_write_slots = list(range(self.max_pending - 1, -1, -1)) if self.writes else []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        if self.writes:
            self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
            self._writer.start()

    # ---- save ----
    def save(self, blocks: Sequence[int], host_slots: Sequence[int], hashes: Sequence[int],
             tokens: Sequence[Sequence[int]], to_store: Sequence[bool]) -> None:
        """Copy device ``blocks`` to host slots (where >= 0) and queue those marked ``to_store``: the blocks are
        gathered once on the device for both."""
        host = [i for i, s in enumerate(host_slots) if s >= 0] if self.host is not None else []
        chosen = [i for i, flag in enumerate(to_store) if flag] if self.writes else []
        write_slots = self._take_write_slots(len(chosen)) if chosen else []
        if not write_slots:
            chosen = []
        if not host and not chosen:
            return
        rows = sorted(set(host) | set(chosen))  # the gathered tensor's row of each saved block
        row_of = {i: r for r, i in enumerate(rows)}
        data = self._gather([blocks[i] for i in rows])
        copies: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = []
        if host:
            assert self.host is not None
            copies.append((data, self.host, [row_of[i] for i in host], [host_slots[i] for i in host]))
        if chosen:
            assert self._write_slots is not None
            values = self._as_values(data, [row_of[i] for i in chosen])
            copies.append((values, self._write_slots, list(range(len(chosen))), write_slots))
        event = self._copy_out(copies)
        if chosen:  # the writer waits for the event before it reads the slots
            self._queue.put(([hashes[i] for i in chosen], [tokens[i] for i in chosen], write_slots, event))

    def _as_values(self, data: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` of the gathered blocks laid out as stored values ([k, value bytes], on ``data``'s device),
        their headers left for the writer to fill in.

        NOTE: a run of write slots is then one contiguous copy. Their latents alone are strided (each slot's header
        lies between): copy_ into a strided host tensor goes through a pageable buffer and waits for the device,
        and a copy a slot costs the step's thread about 0.1 ms each (a save of 32 V2-Lite blocks: 3 ms)."""
        out = torch.empty((len(rows), self.layout.value_bytes), dtype=torch.uint8, device=data.device)
        latent = out[:, self.layout.head_bytes:].view(data.dtype).view(len(rows), *data.shape[1:])
        whole = list(rows) == list(range(len(data)))
        latent.copy_(data if whole else data[to_device(torch.tensor(list(rows)), data.device)])
        return out

    def _take_write_slots(self, n: int) -> list[int]:
        """``n`` free write slots, or none (the blocks dropped, counted) when the queue is full."""
        with self._lock:
            if self._pending + n > self.max_pending or len(self._free_write_slots) < n:
                self.counters.writes_dropped += n
                return []
            self._pending += n
            return [self._free_write_slots.pop() for _ in range(n)]

    def _copy_out(self, copies: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[int], Sequence[int]]]
                  ) -> torch.Event | None:
        """For each (src, dest, rows, slots) of ``copies``: device rows ``src[rows[k]]`` into host rows
        ``dest[slots[k]]``. On an accelerator the copies are asynchronous: the returned event follows them.

        NOTE: the blocks are gathered on the step's stream (a device-to-device copy of about 0.1 ms), then copied
        out on a stream of their own. On the step's stream the copies held up the next step: a prompt's blocks
        are hundreds of megabytes, tens of milliseconds over PCIe (decode ITL p99 1.75x with store writes on)."""
        if not self.pin:
            for src, dest, rows, slots in copies:
                whole = list(rows) == list(range(len(src)))
                dest[torch.tensor(list(slots))] = src if whole else src[torch.tensor(list(rows))]
            return None
        assert self._copy_stream is not None
        self._copy_stream.wait_stream(torch.accelerator.current_stream(self.device))
        with self._copy_stream:
            for src, dest, rows, slots in copies:
                for row, slot, n in copy_runs(rows, slots):  # NOTE: whole rows of both: contiguous
                    dest[slot:slot + n].copy_(src[row:row + n], non_blocking=True)
            done = torch.Event(device=self.device)
            done.record()
        for src, *_ in copies:
            src.record_stream(self._copy_stream)  # its memory is not reused before the copies out of it have run
        return done

    def _gather(self, blocks: Sequence[int]) -> torch.Tensor:
        """Device blocks -> a new device tensor [n, L, block_size, kv_dim]."""
        return gather_blocks(self.caches, self._stacked, to_device(torch.tensor(list(blocks)), self.device))

    def _write_loop(self) -> None:
        assert self.store is not None and self._write_slots is not None
        values = self._write_slots.numpy()  # [slots, value bytes]: a slot's row is its block's stored value
        while True:
            item = self._queue.get()
            if item is None:
                return
            hashes, tokens, slots, event = item
            try:
                if event is not None:
                    event.synchronize()  # the copies into the slots have landed
                items = []
                for h, t, slot in zip(hashes, tokens, slots):
                    value = values[slot].data
                    encode_block_into(self.layout, h, t, value)
                    items.append((self.layout.key(h), value))
                self.store.put(items)
                self.counters.blocks_written += len(hashes)
            except StoreError as e:
                logger.debug("store write dropped: %s", e)
            finally:
                with self._lock:
                    self._pending -= len(hashes)
                    self._free_write_slots.extend(reversed(slots))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until queued writes are done (tests, benchmarks); False on timeout."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return True
            time.sleep(0.005)
        return False

    # ---- load ----
    def load_host(self, host_slots: Sequence[int], host_blocks: Sequence[int]) -> None:
        """Host-pool slots -> device blocks (at once: a later save may reuse the slots)."""
        if not host_slots:
            return
        assert self.host is not None, "a host-tier load on a rank without a host pool"
        if not self.pin:
            self._to_device(self.host[torch.tensor(list(host_slots))], host_blocks)
            return
        # NOTE: each slot goes from the pinned pool to a device staging block in one asynchronous copy, queued on
        # this thread's stream after the saves' copies into the slots (the stream waits for the copy stream's: no
        # wait on the host, and no host-side gather of the prefix), then into the cache (one op for every layer)
        assert self._copy_stream is not None
        torch.accelerator.current_stream(self.device).wait_stream(self._copy_stream)
        for lo in range(0, len(host_slots), HOST_LOAD_CHUNK):
            slots, blocks = host_slots[lo:lo + HOST_LOAD_CHUNK], host_blocks[lo:lo + HOST_LOAD_CHUNK]
            staged = torch.empty((len(slots), *self.block_shape), dtype=self.host.dtype, device=self.device)
            for i, slot in enumerate(slots):
                staged[i].copy_(self.host[slot], non_blocking=True)
            scatter_blocks(self.caches, self._stacked, to_device(torch.tensor(list(blocks)), self.device), staged)

    def load_store(self, store_hashes: Sequence[int], store_tokens: Sequence[Sequence[int]],
                   store_blocks: Sequence[int]) -> LoadReport:
        """Stored blocks -> device blocks (the loader thread): how many, from the first, arrived."""
        if not store_hashes or self.loader is None:
            return LoadReport(0, 0, 0)
        try:
            r = self.loader.load(store_hashes, store_tokens, store_blocks)
        except StoreError as e:
            logger.warning("loading %d stored blocks failed (%s): recomputing them", len(store_hashes), e)
            return LoadReport(0, 0, 0, str(e))
        self.counters.corrupt_blocks += r.num_corrupt
        return LoadReport(r.num_ok, r.nbytes, r.num_corrupt)

    def load_layerwise(self, host_slots: Sequence[int], host_blocks: Sequence[int], store_hashes: Sequence[int],
                       store_tokens: Sequence[Sequence[int]], store_blocks: Sequence[int],
                       on_layer: Callable[[int], None]) -> LoadReport:
        """Both, layer by layer (the loader thread of a layer-wise load): ``on_layer(j)`` once the first j
        layers of every block are in. On a CPU the host slots are copied here, one layer at a time; on an
        accelerator they were queued at once (``load_host``, in stream order before the step that reads them)."""
        if not self.pin and host_slots:
            assert self.host is not None, "a host-tier load on a rank without a host pool"
            # NOTE: numpy, not torch: a torch op on this thread would start a second OpenMP team, whose threads
            # spin after it on the cores the step computes on (the step ran twice as long)
            host, slots, idx = self.host.numpy(), np.array(host_slots), np.array(host_blocks)
            for j, cache in enumerate(self.caches):
                cache.numpy()[idx] = host[slots, j]
                if not store_hashes:
                    on_layer(j + 1)
        if not store_hashes or self.loader is None:
            on_layer(len(self.caches))
            return LoadReport(0, 0, 0)
        try:
            r = self.loader.load_layers(store_hashes, store_tokens, store_blocks, on_layer)
        except StoreError as e:
            logger.warning("loading %d stored blocks failed (%s): recomputing them", len(store_hashes), e)
            return LoadReport(0, 0, 0, str(e))
        self.counters.corrupt_blocks += r.num_corrupt
        return LoadReport(r.num_ok, r.nbytes, r.num_corrupt)

    def load(self, host_slots: Sequence[int], host_blocks: Sequence[int], store_hashes: Sequence[int],
             store_tokens: Sequence[Sequence[int]], store_blocks: Sequence[int]) -> LoadReport:
        """Both at once, in the calling thread."""
        self.load_host(host_slots, host_blocks)
        return self.load_store(store_hashes, store_tokens, store_blocks)

    def _to_device(self, data: torch.Tensor, blocks: Sequence[int]) -> None:
        """``data`` [n, L, block_size, kv_dim] on the host -> blocks of the (CPU) cache."""
        scatter_blocks(self.caches, self._stacked, torch.tensor(list(blocks)), data)

    def close(self) -> None:
        """Stop the writer and let go of the cache tensors and the host pool (the engine is closing)."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=5)
            self._writer = None
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        self.caches = []
        self._stacked = None
        self.host = None
        self._write_slots = None
