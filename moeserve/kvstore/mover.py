"""BlockMover: the rank's side of the host tier and the shared store (it owns tensors; the coordinator's
``TierManager`` owns every decision, and says which block goes where).

- ``save``: copy computed device blocks into host-pool slots, and (on the rank that writes for its stage, tp
  rank 0) queue them for the store (kvstore/store_writer.py: a bounded queue, a thread that writes it).
- ``load_host``: copy host-pool slots into device blocks; ``load_store``: read stored blocks into device
  blocks (kvstore/store_load.py: chunks in parallel, received in place). Reports how many stored blocks, from the first, it loaded:
  a missing, corrupt or timed-out block ends the prefix there (the coordinator recomputes the rest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.device_copy import to_device
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.latent_cache import gather_blocks, scatter_blocks, stacked_view, take_rows
from moeserve.kvstore.store import WRITE_BUFFER_BYTES, KVStore, StoreError
from moeserve.kvstore.store_load import StoreLoader
from moeserve.kvstore.store_writer import StoreWriter, WriteCounters

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
class MoverCounters(WriteCounters):
    corrupt_blocks: int = 0  # stored blocks received but not usable


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
        self.writer = StoreWriter(store, layout, self.block_shape, first.dtype, self.pin, write_queue_bytes,
                                  self.counters) if store is not None and writes else None

    # ---- save ----
    def save(self, blocks: Sequence[int], host_slots: Sequence[int], hashes: Sequence[int],
             tokens: Sequence[Sequence[int]], to_store: Sequence[bool]) -> None:
        """Copy device ``blocks`` to host slots (where >= 0) and queue those marked ``to_store``: the blocks are
        gathered once on the device for both."""
        host = [i for i, s in enumerate(host_slots) if s >= 0] if self.host is not None else []
        writer = self.writer
        chosen = [i for i, flag in enumerate(to_store) if flag] if writer is not None else []
        write_slots = writer.take_slots(len(chosen)) if writer is not None and chosen else []
        chosen = chosen[:len(write_slots)]  # the first blocks of a prefix are the ones worth storing
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
            assert writer is not None and writer.slots is not None and writer.latents is not None
            if self.pin:  # NOTE: whole values, so that a run of slots is one copy (StoreWriter.as_values)
                values = writer.as_values(data, [row_of[i] for i in chosen])
                copies.append((values, writer.slots, list(range(len(chosen))), write_slots))
            else:  # on a CPU straight into the slots' latents (one copy; a strided destination costs nothing)
                copies.append((data, writer.latents, [row_of[i] for i in chosen], write_slots))
        event = self._copy_out(copies)
        if writer is not None and chosen:  # the writer waits for the event before it reads the slots
            writer.submit([hashes[i] for i in chosen], [tokens[i] for i in chosen], write_slots, event)

    def _copy_out(self, copies: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[int], Sequence[int]]]
                  ) -> torch.Event | None:
        """For each (src, dest, rows, slots) of ``copies``: device rows ``src[rows[k]]`` into host rows
        ``dest[slots[k]]``. On an accelerator the copies are asynchronous: the returned event follows them.

        NOTE: the blocks are gathered on the step's stream (a device-to-device copy of about 0.1 ms), then copied
        out on a stream of their own. On the step's stream the copies held up the next step: a prompt's blocks
        are hundreds of megabytes, tens of milliseconds over PCIe (decode ITL p99 1.75x with store writes on)."""
        if not self.pin:
            for src, dest, rows, slots in copies:
                dest[torch.tensor(list(slots))] = take_rows(src, rows)
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

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until queued store writes are done (tests, benchmarks); False on timeout."""
        return self.writer.flush(timeout_s) if self.writer is not None else True

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
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        self.caches = []
        self._stacked = None
        self.host = None
