"""A prefill instance's side of the KV transfer (kvstore/remote.py has the wire and the puller's side):
``HeldTransfers`` keeps finished requests' blocks by transfer id until the decode instance has them all (or
their time is up); the coordinator's ``KvTransferServer`` says which blocks match and where their layers are;
each stage's ``KvBlockServer`` (on tp rank 0 of the stage, or in the one process) serves its layers. Each is a
ROUTER socket answered on a thread."""

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


class _RouterThread:
    """A ROUTER socket answered on a thread: ``_answer`` turns a request's frames into the reply's."""

    def __init__(self, bind: str, name: str):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self.address = str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(200):
                continue
            identity, *frames = self._sock.recv_multipart()
            try:
                if len(frames) != 1:
                    raise ValueError("a request is one msgpack frame")
                body = msgpack.unpackb(frames[0], raw=False)
                if not isinstance(body, dict):
                    raise ValueError("a request is a msgpack map")
                reply = self._answer(body)
            except Exception as e:  # noqa: BLE001 - a bad request gets an error answer; the server goes on
                reply = [header(False, f"{type(e).__name__}: {e}")]
            self._sock.send_multipart([identity, *reply], copy=False)

    def _answer(self, body: dict) -> list:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)


def check_layout(mine: dict, body: dict) -> str:
    """"" when the request's model and cache layout are this side's, else what differs."""
    theirs = {k: body.get(k) for k in mine}
    if theirs == mine:
        return ""
    what = "model fingerprint" if theirs["fingerprint"] != mine["fingerprint"] else "cache layout"
    return f"{what} mismatch: this prefill instance has {mine}, the puller {theirs}"


class KvTransferServer(_RouterThread):
    """A prefill instance's transfer address (its coordinator): ``resolve`` says which held blocks match a
    decode rank's hashes and where their layers are served (``sources``: ``KvBlockServer``s, one per stage);
    ``release`` lets the hold go once the decode instance has them all."""

    def __init__(self, layout_fields_: dict, held: HeldTransfers, bind: str,
                 sources: list[tuple[str, int, int]], block_bytes: int):
        """``layout_fields_``: fingerprint, dtype, block size and kv_dim a puller must have; ``sources``:
        (address, first layer, number of layers) of each stage's block server; ``block_bytes``: one block's
        latent over every layer (what a transfer moves per block)."""
        self.mine = layout_fields_
        self.held = held
        self.sources = sources
        self.block_bytes = block_bytes
        self.stats = TransferStats("prefill")
        self._resolved: dict[str, tuple[int, float]] = {}  # transfer -> (bytes handed over, when resolved)
        super().__init__(bind, "kv-transfer-server")

    def _answer(self, body: dict) -> list:
        tid = str(body.get("transfer_id"))
        if body.get("op") == "release":
            held = self.held.take(tid)
            if held is not None:
                self.held.done(held)
            resolved = self._resolved.pop(tid, None)
            if resolved is not None:
                self.stats.record(resolved[0], time.perf_counter() - resolved[1], True)
            return [header(True, "")]
        if body.get("op") != "resolve":
            return [header(False, "not a transfer request")]
        why = check_layout(self.mine, body)
        if why:
            return [header(False, why)]
        held = self.held.peek(tid)
        if held is None:
            return [header(False, f"unknown or expired transfer id {tid!r}")]
        first, n = _matching(held, [str(h) for h in body.get("hashes", [])])
        self._resolved.setdefault(tid, (n * self.block_bytes, time.perf_counter()))
        return [msgpack.packb({"ok": True, "error": "", "num_blocks": n, "blocks": held.blocks[first:first + n],
                               "sources": [list(src) for src in self.sources]}, use_bin_type=True)]


class KvBlockServer(_RouterThread):
    """Serves one rank's layers of given blocks: ``read`` answers with one raw frame per layer asked for
    (``[n, block_size, kv_dim]``, sent from the gathered tensor without a copy); ``descs`` (NIXL) with the
    agent's metadata and an ``[address, length, device]`` descriptor per layer and block."""

    def __init__(self, caches: dict[int, torch.Tensor], layout: BlockLayout, bind: str,
                 nixl: NixlAgent | None = None):
        self.caches = dict(caches)
        self.mine = layout_fields(layout)
        self.nixl = nixl
        super().__init__(bind, "kv-block-server")

    def _answer(self, body: dict) -> list:
        why = check_layout(self.mine, body)
        if why:
            return [header(False, why)]
        start, end = int(body.get("layer_start", -1)), int(body.get("layer_end", -1))
        if not (start < end and all(i in self.caches for i in range(start, end))):
            return [header(False, f"layers {start}-{end} are not this rank's ({min(self.caches)}-"
                                  f"{max(self.caches) + 1})")]
        blocks = [int(b) for b in body.get("blocks", [])]
        layers = [self.caches[i] for i in range(start, end)]
        if body.get("op") == "descs":
            if self.nixl is None:
                return [header(False, "this prefill instance has no NIXL agent (--kv-transfer-backend nixl)")]
            descs = self.nixl.descriptors(blocks, layers)
            return [msgpack.packb({"ok": True, "error": "", "num_blocks": len(blocks), "agent": self.nixl.metadata,
                                   "descs": descs}, use_bin_type=True)]
        if body.get("op") != "read":
            return [header(False, "not a read")]
        if not blocks:
            return [header(True, "", 0), *(b"" for _ in layers)]
        idx = to_device(torch.tensor(blocks), layers[0].device)
        data = [c.index_select(0, idx).cpu().contiguous() for c in layers]
        return [header(True, "", len(blocks)), *(t.view(torch.uint8).numpy() for t in data)]

    def close(self) -> None:
        super().close()
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


