"""Device-to-host copies of saved blocks, queued a few pieces at a time by a thread of their own.

A GPU has one copy engine for each direction, and a small device-to-host copy waits behind every one queued
before it, on any stream (benchmarks/results/gpu_h100_session17, ``probe_copies.py``: 4.4-4.9 ms behind 256
MB, whole or cut into pieces). A step's sampled ids come back to the host that way. So a save that queued a
prompt's hundreds of megabytes at once held up the next decode steps' ids for as long as the copies took
(decode ITL p99 1.23x with store writes on, against writes off, after the save stopped waiting on the host).
Here the pieces are queued on the copy stream only ``IN_FLIGHT`` at a time: an id copy waits behind at most
those, a fraction of a millisecond, and the copies still keep the copy engine busy.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Sequence

import torch

from moeserve.kvstore.store import StoreError

logger = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # about 0.15 ms over PCIe 5
IN_FLIGHT = 2  # pieces queued on the copy stream at once: the copy engine never waits for the thread


class PacedDone:
    """Stands for a save's copies: ``synchronize`` returns once every piece has landed on the host."""

    def __init__(self) -> None:
        self._queued = threading.Event()
        self._event: torch.Event | None = None
        self._error = ""

    def _finish(self, event: torch.Event | None, error: str = "") -> None:
        self._event, self._error = event, error
        self._queued.set()

    def wait_queued(self) -> None:
        self._queued.wait()

    def synchronize(self) -> None:
        self._queued.wait()
        if self._error:
            raise StoreError(f"the copy of saved blocks out of the device failed: {self._error}")
        assert self._event is not None
        self._event.synchronize()


def pieces(dest: torch.Tensor, src: torch.Tensor, piece_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dest, src) cut along their first dimension into pieces of about ``piece_bytes`` (whole rows)."""
    row_bytes = max(1, src[0].numel() * src.element_size()) if len(src) else 1
    step = max(1, piece_bytes // row_bytes)
    return [(dest[i:i + step], src[i:i + step]) for i in range(0, len(src), step)]


class CopyPacer:
    """Queues device-to-host copies on ``stream`` in pieces, ``in_flight`` at a time, in the order submitted."""

    def __init__(self, stream: torch.Stream, device: torch.device, piece_bytes: int = PIECE_BYTES,
                 in_flight: int = IN_FLIGHT) -> None:
        self.stream, self.device = stream, device
        self.piece_bytes, self.in_flight = piece_bytes, in_flight
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._last: PacedDone | None = None
        self._thread = threading.Thread(target=self._run, name="moeserve-copy-pacer", daemon=True)
        self._thread.start()

    def submit(self, copies: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> PacedDone:
        """``copies``: (host destination, device source) pairs of equal shapes, contiguous rows. The caller has
        made the stream wait for the work that writes the sources. The sources are held until their last piece
        is queued (a source's memory is then kept by ``record_stream`` until the copies have run)."""
        done = PacedDone()
        self._last = done
        self._queue.put((list(copies), done))
        return done

    def drain(self) -> None:
        """Block until every copy submitted so far is queued on the stream (not landed): work queued on
        another stream after its ``wait_stream(stream)`` then follows them."""
        if self._last is not None:
            self._last.wait_queued()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        events: collections.deque[torch.Event] = collections.deque()
        while True:
            item = self._queue.get()
            if item is None:
                return
            copies, done = item
            try:
                done._finish(self._queue_copies(copies, events))
            except Exception as e:  # noqa: BLE001  (the writer drops these blocks; the engine goes on)
                logger.warning("copying saved blocks out of the device failed: %s", e)
                done._finish(None, f"{type(e).__name__}: {e}")
            del copies, item  # the sources' last references: their memory waits for the stream from here

    def _queue_copies(self, copies: list[tuple[torch.Tensor, torch.Tensor]],
                      events: collections.deque[torch.Event]) -> torch.Event:
        """Queue ``copies`` piece by piece, no more than ``in_flight`` pieces ahead of the copy engine. -> an event
        after the last piece."""
        with self.stream:
            for dest, src in copies:
                for d, s in pieces(dest, src, self.piece_bytes):
                    while len(events) >= self.in_flight:
                        events.popleft().synchronize()
                    d.copy_(s, non_blocking=True)
                    event = torch.Event(device=self.device)
                    event.record()
                    events.append(event)
            final = torch.Event(device=self.device)
            final.record()
        return final
