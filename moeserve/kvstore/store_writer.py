"""StoreWriter: a rank's queue of blocks waiting to be written to the shared store, and the thread that writes
them (kvstore/mover.py's ``BlockMover.save`` fills it).

The queue is bounded: when full, the blocks are dropped (counted), so that a slow store never slows a step
(256 MiB of blocks by default, ``--kv-store-write-buffer``). The blocks wait in slots allocated once, each laid
out as the block's stored value (header, token ids, latent): the writer thread encodes a slot in place and the
store sends it as it is. A copy of the latent there held the GIL for about a millisecond a block, and the thread
that runs the steps waited for it (bench_kvstore_writes.py). On an accelerator the slots are pinned: the copies
into them are asynchronous, and a pinned allocation on the step's path (cudaHostAlloc) costs milliseconds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeserve.kvstore.block_format import BlockLayout, encode_block_into
from moeserve.kvstore.latent_cache import take_rows
from moeserve.kvstore.store import KVStore, StoreError

logger = logging.getLogger(__name__)


@dataclass
class WriteCounters:
    writes_dropped: int = 0  # blocks not written because the queue was full
    blocks_written: int = 0


class StoreWriter:
    def __init__(self, store: KVStore, layout: BlockLayout, block_shape: tuple[int, ...], dtype: torch.dtype,
                 pin: bool, queue_bytes: int, counters: WriteCounters):
        """``block_shape``: one block's latent [layers, block_size, kv_dim] in ``dtype``; ``counters``: where the
        writes dropped and done are counted (the rank's ``MoverCounters``)."""
        self.store = store
        self.layout = layout
        self.counters = counters
        self.max_pending = max(1, queue_bytes // layout.payload_bytes)  # blocks waiting to be written
        self._pending = 0
        self.slots: torch.Tensor | None = torch.empty((self.max_pending, layout.value_bytes), dtype=torch.uint8,
                                                      pin_memory=pin)
        # each slot's latent part as a block: a CPU save's destination (``latents``)
        self.latents: torch.Tensor | None = self.slots[:, layout.head_bytes:].view(dtype).view(
            self.max_pending, *block_shape)
        # taken from the end, given back reversed: a save's slots come in ascending runs (mover.copy_runs)
        self._free = list(range(self.max_pending - 1, -1, -1))
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = threading.Thread(target=self._write_loop, name="kv-store-writer",
                                                                 daemon=True)
        self._thread.start()

    def take_slots(self, n: int) -> list[int]:
        """Up to ``n`` free slots: as many as the queue has room for, the rest of the blocks dropped (counted)."""
        with self._lock:
            k = max(0, min(n, self.max_pending - self._pending, len(self._free)))
            self.counters.writes_dropped += n - k
            self._pending += k
            return [self._free.pop() for _ in range(k)]

    def as_values(self, data: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` of gathered blocks ``data`` laid out as stored values ([k, value bytes], on ``data``'s
        device), their headers left for the writer to fill in.

        NOTE: a run of slots is then one contiguous copy. Their latents alone are strided (each slot's header lies
        between): copy_ into a strided host tensor goes through a pageable buffer and waits for the device, and a
        copy a slot costs the step's thread about 0.1 ms each (a save of 32 V2-Lite blocks: 3 ms)."""
        out = torch.empty((len(rows), self.layout.value_bytes), dtype=torch.uint8, device=data.device)
        latent = out[:, self.layout.head_bytes:].view(data.dtype).view(len(rows), *data.shape[1:])
        latent.copy_(take_rows(data, rows))
        return out

    def submit(self, hashes: Sequence[int], tokens: Sequence[Sequence[int]], slots: Sequence[int],
               event: torch.Event | None) -> None:
        """Write the blocks in ``slots`` once ``event`` (the copies into them) has completed."""
        self._queue.put((list(hashes), list(tokens), list(slots), event))

    def _write_loop(self) -> None:
        assert self.slots is not None
        values = self.slots.numpy()  # [slots, value bytes]: a slot's row is its block's stored value
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
                    self._free.extend(reversed(slots))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until queued writes are done (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Stop the thread and let go of the slots."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None
        self.slots = self.latents = None
