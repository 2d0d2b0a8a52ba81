"""A prefill instance's side of the KV transfer (kvstore/remote.py has the wire and the puller's side):
``HeldTransfers`` keeps finished requests' blocks by transfer id until a decode instance has pulled them (or
their time is up), and ``KvTransferServer`` answers pulls on a ROUTER socket in a thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import torch
import zmq

from moeserve.device_copy import to_device
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.nixl_transfer import NixlAgent
from moeserve.kvstore.remote import TransferStats, header, layout_fields

logger = logging.getLogger(__name__)


@dataclass
class _Held:
    blocks: list[int]
    hashes: list[str]
    deadline: float


class HeldTransfers:
    """Blocks a prefill instance keeps for decode instances to pull, by transfer id, until pulled or expired.
    The engine thread adds holds and frees what ``take_released`` returns; the server thread pulls."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self._held: dict[str, _Held] = {}
        self._released: list[list[int]] = []
        self._lock = threading.Lock()

    def hold(self, transfer_id: str, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        with self._lock:
            old = self._held.pop(transfer_id, None)
            if old is not None:
                self._released.append(old.blocks)
            self._held[transfer_id] = _Held(list(blocks), [f"{h:032x}" for h in hashes],
                                            time.monotonic() + self.hold_s)

    def peek(self, transfer_id: str) -> _Held | None:
        with self._lock:
            return self._held.get(transfer_id)

    def take(self, transfer_id: str) -> _Held | None:
        """The hold of a transfer, for the server to send (it gives it back with ``done``)."""
        with self._lock:
            return self._held.pop(transfer_id, None)

    def done(self, held: _Held) -> None:
        with self._lock:
            self._released.append(held.blocks)

    def take_released(self) -> list[list[int]]:
        """Blocks to free: pulled, replaced, or held past their time (nobody came for them)."""
        now = time.monotonic()
        with self._lock:
            expired = [k for k, h in self._held.items() if h.deadline < now]
            for k in expired:
                logger.warning("transfer %s was not pulled within %.0f s: its blocks are freed", k, self.hold_s)
                self._released.append(self._held.pop(k).blocks)
            out, self._released = self._released, []
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


class KvTransferServer:
    """A prefill instance's side: a ROUTER socket on a thread, serving pulls of held blocks."""

    def __init__(self, caches: dict[int, torch.Tensor], layout: BlockLayout, held: HeldTransfers, bind: str,
                 nixl: NixlAgent | None = None):
        """``nixl``: this instance's NIXL agent (its caches registered), to answer NIXL pulls."""
        self.caches = [caches[i] for i in sorted(caches)]
        self.layout = layout
        self.held = held
        self.nixl = nixl
        self._lent: dict[str, tuple[int, float]] = {}  # NIXL pulls answered, until released: bytes, start
        self.stats = TransferStats("prefill")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self.address = str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-transfer-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(200):
                continue
            identity, *frames = self._sock.recv_multipart()
            start = time.perf_counter()
            try:
                reply = self._answer(frames)
            except Exception as e:  # noqa: BLE001 - a bad pull gets an error answer; the server goes on
                reply = [header(False, f"{type(e).__name__}: {e}")]
            self._sock.send_multipart([identity, *reply], copy=False)
            if len(reply) > 1:  # frames sent: a ZeroMQ transfer, done
                nbytes = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in reply[1:])
                self.stats.record(nbytes, time.perf_counter() - start, True)

    def _answer(self, frames: list[bytes]) -> list:
        if len(frames) != 1:
            return [header(False, "a pull is one msgpack frame")]
        pull = msgpack.unpackb(frames[0], raw=False)
        if isinstance(pull, dict) and pull.get("op") == "release":
            self._release(str(pull.get("transfer_id")))
            return [header(True, "")]
        if not isinstance(pull, dict) or pull.get("op") != "pull":
            return [header(False, "not a pull")]
        mine = layout_fields(self.layout)
        theirs = {k: pull.get(k) for k in mine}
        if theirs != mine:
            what = "model fingerprint" if theirs["fingerprint"] != mine["fingerprint"] else "cache layout"
            return [header(False, f"{what} mismatch: this prefill instance has {mine}, the puller {theirs}")]
        tid, hashes = str(pull.get("transfer_id")), [str(h) for h in pull.get("hashes", [])]
        if pull.get("backend") == "nixl":
            return self._descriptors(tid, hashes)
        held = self.held.take(tid)
        if held is None:
            return [header(False, f"unknown or expired transfer id {tid!r}")]
        try:
            return self._blocks(held, hashes)
        finally:
            self.held.done(held)

    def _descriptors(self, tid: str, hashes: list[str]) -> list:
        """A NIXL pull: where the held blocks are (the hold stays until ``release``)."""
        if self.nixl is None:
            return [header(False, "this prefill instance has no NIXL agent (--kv-transfer-backend nixl)")]
        held = self.held.peek(tid)
        if held is None:
            return [header(False, f"unknown or expired transfer id {tid!r}")]
        first, n = _matching(held, hashes)
        blocks = held.blocks[first:first + n]
        descs = self.nixl.descriptors(blocks)
        self._lent[tid] = (sum(d[1] for d in descs), time.perf_counter())
        return [msgpack.packb({"ok": True, "error": "", "num_blocks": n, "agent": self.nixl.metadata,
                               "descs": descs}, use_bin_type=True)]

    def _release(self, tid: str) -> None:
        held = self.held.take(tid)
        if held is not None:
            self.held.done(held)
        lent = self._lent.pop(tid, None)
        if lent is not None:
            self.stats.record(lent[0], time.perf_counter() - lent[1], True)

    def _blocks(self, held: _Held, hashes: list[str]) -> list:
        first, n = _matching(held, hashes)
        if n == 0:
            return [header(True, "", 0), *(b"" for _ in self.caches)]
        idx = to_device(torch.tensor(held.blocks[first:first + n]), self.caches[0].device)
        layers = [c.index_select(0, idx).cpu().contiguous() for c in self.caches]
        return [header(True, "", n), *(t.view(torch.uint8).numpy() for t in layers)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)
        if self.nixl is not None:
            self.nixl.close()


def _matching(held: _Held, hashes: list[str]) -> tuple[int, int]:
    """Where the held blocks matching ``hashes`` (from the first) start, and how many match."""
    if not hashes or hashes[0] not in held.hashes:
        return 0, 0
    first = held.hashes.index(hashes[0])
    n = 0
    while n < len(hashes) and first + n < len(held.hashes) and held.hashes[first + n] == hashes[n]:
        n += 1
    return first, n


