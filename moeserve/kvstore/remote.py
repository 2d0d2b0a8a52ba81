"""Instance-to-instance KV transfer over ZeroMQ (``--kv-transfer-backend zmq``): a prefill instance's
``KvTransferServer`` hands the latent blocks it holds for a transfer to the decode instance that pulls them
(``pull_remote_blocks``, run by a rank's loader thread, kvstore/transport.py).

With ``--kv-transfer-backend nixl`` the answer carries descriptors instead of bytes and the puller reads them
by NIXL, then sends ``release`` (kvstore/nixl_transfer.py).

Wire (one DEALER -> ROUTER exchange per transfer): the pull is one msgpack map -- the transfer id, the chain
hashes of the blocks wanted (32 hex digits each), the puller's model fingerprint and cache layout; no tensor,
no pickle. The answer is a msgpack header (``ok``, ``error``, ``num_blocks``) followed, when ok, by one raw
frame per layer: ``[num_blocks, block_size, kv_dim]`` in the cache dtype, C order, sent from the gathered
tensor without a copy and read into the puller's cache with ``torch.frombuffer``. The server answers the
longest run of held blocks matching the hashes from the first, then lets the hold go (one pull per transfer).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import torch
import zmq

from moeserve.comm.messages import KvLoadMsg
from moeserve.device_copy import to_device
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.mover import BlockMover, LoadReport
from moeserve.kvstore.nixl_transfer import NixlAgent

logger = logging.getLogger(__name__)

TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def layout_fields(layout: BlockLayout) -> dict:
    """What both sides must agree on for the bytes to mean the same latents."""
    return {"fingerprint": layout.fingerprint, "dtype": layout.dtype, "block_size": layout.block_size,
            "layer_start": layout.layer_start, "num_layers": layout.num_layers, "kv_dim": layout.kv_dim}


@dataclass
class TransferStats:
    """One role's transfers (the /metrics families ``moeserve_kv_transfer_*``)."""

    role: str
    num_bytes: int = 0
    count: int = 0
    failures: int = 0
    seconds_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(TRANSFER_BUCKETS) + 1))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, num_bytes: int, seconds: float, ok: bool) -> None:
        import bisect

        with self._lock:
            self.num_bytes += num_bytes
            self.count += 1
            self.failures += not ok
            self.seconds_sum += seconds
            self.buckets[bisect.bisect_left(TRANSFER_BUCKETS, seconds)] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"transfer_role": self.role, "transfer_bytes": self.num_bytes, "transfers": self.count,
                    "transfer_failures": self.failures, "transfer_s_sum": self.seconds_sum,
                    "transfer_s_buckets": list(self.buckets)}


# ---- the decode side: pull ----

def pull_remote_blocks(mover: BlockMover, msg: KvLoadMsg, nixl: NixlAgent | None = None) -> LoadReport:
    """Pull the blocks of ``msg`` (its ``remote_*`` fields) into this rank's cache: how many, from the first,
    arrived. A refusal, a timeout or a broken answer loads nothing (the engine recomputes). With ``nixl``
    (``msg.remote_backend == "nixl"``) the answer holds descriptors and the bytes come by a NIXL read."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 500)  # the release after a NIXL read still goes out as the socket closes
    start = time.monotonic()
    try:
        sock.connect(msg.remote_addr)
        sock.send(msgpack.packb({"op": "pull", "transfer_id": msg.remote_id, "hashes": msg.remote_hashes,
                                 "backend": msg.remote_backend, **layout_fields(mover.layout)}, use_bin_type=True))
        if not sock.poll(int(msg.remote_timeout_s * 1000)):
            return LoadReport(0, 0, 0, f"no answer from {msg.remote_addr} within {msg.remote_timeout_s:.1f} s")
        frames = sock.recv_multipart(copy=False)
        if msg.remote_backend != "nixl":
            return _copy_in(mover, msg, frames)
        assert nixl is not None, "a NIXL pull on a rank without a NIXL agent"
        report = _read_nixl(mover, msg, frames, nixl, msg.remote_timeout_s - (time.monotonic() - start))
        sock.send(msgpack.packb({"op": "release", "transfer_id": msg.remote_id}, use_bin_type=True))
        return report
    except zmq.ZMQError as e:
        return LoadReport(0, 0, 0, f"transfer from {msg.remote_addr} failed: {e}")
    finally:
        sock.close()


def _read_nixl(mover: BlockMover, msg: KvLoadMsg, frames: list, nixl: NixlAgent, timeout_s: float) -> LoadReport:
    try:
        head = msgpack.unpackb(frames[0].bytes, raw=False)
        ok, error, n = bool(head["ok"]), str(head.get("error", "")), int(head.get("num_blocks", 0))
        agent, descs = bytes(head.get("agent", b"")), [[int(x) for x in d] for d in head.get("descs", [])]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        return LoadReport(0, 0, 0, f"malformed transfer header: {e}")
    if not ok:
        return LoadReport(0, 0, 0, error or "refused")
    n = min(n, len(msg.remote_blocks))
    if n == 0:
        return LoadReport(0, 0, 0)
    per_layer = len(descs) // len(mover.caches)
    mine = [d for layer in range(len(mover.caches)) for d in descs[layer * per_layer:layer * per_layer + n]]
    why = nixl.read(agent, mine, msg.remote_blocks[:n], max(0.1, timeout_s))
    if why:
        return LoadReport(0, 0, 0, why)
    return LoadReport(n, sum(d[1] for d in mine), 0)


def _copy_in(mover: BlockMover, msg: KvLoadMsg, frames: list) -> LoadReport:
    try:
        head = msgpack.unpackb(frames[0].bytes, raw=False)
        ok, error, n = bool(head["ok"]), str(head.get("error", "")), int(head.get("num_blocks", 0))
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        return LoadReport(0, 0, 0, f"malformed transfer header: {e}")
    if not ok:
        return LoadReport(0, 0, 0, error or "refused")
    n = min(n, len(msg.remote_blocks))
    layout = mover.layout
    per_layer = n * layout.block_size * layout.kv_dim * mover.caches[0].element_size()
    if len(frames) != 1 + len(mover.caches) or any(len(f.buffer) != per_layer for f in frames[1:]):
        return LoadReport(0, 0, 0, "the transfer's frames do not match the cache layout")
    if n == 0:
        return LoadReport(0, 0, 0)
    idx = to_device(torch.tensor(list(msg.remote_blocks[:n])), mover.device)
    for cache, frame in zip(mover.caches, frames[1:]):
        with warnings.catch_warnings():  # a read-only buffer: it is only copied from
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(frame.buffer, dtype=cache.dtype).view(n, *cache.shape[1:])
        cache.index_copy_(0, idx, to_device(src, mover.device))
    if mover.device.type != "cpu":  # the report says the blocks are in: let the copies land first
        landed = torch.Event(device=mover.device)
        landed.record()
        landed.synchronize()
    return LoadReport(n, per_layer * len(mover.caches), 0)


# ---- the prefill side: hold and serve ----

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
                reply = [_header(False, f"{type(e).__name__}: {e}")]
            self._sock.send_multipart([identity, *reply], copy=False)
            if len(reply) > 1:  # frames sent: a ZeroMQ transfer, done
                nbytes = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in reply[1:])
                self.stats.record(nbytes, time.perf_counter() - start, True)

    def _answer(self, frames: list[bytes]) -> list:
        if len(frames) != 1:
            return [_header(False, "a pull is one msgpack frame")]
        pull = msgpack.unpackb(frames[0], raw=False)
        if isinstance(pull, dict) and pull.get("op") == "release":
            self._release(str(pull.get("transfer_id")))
            return [_header(True, "")]
        if not isinstance(pull, dict) or pull.get("op") != "pull":
            return [_header(False, "not a pull")]
        mine = layout_fields(self.layout)
        theirs = {k: pull.get(k) for k in mine}
        if theirs != mine:
            what = "model fingerprint" if theirs["fingerprint"] != mine["fingerprint"] else "cache layout"
            return [_header(False, f"{what} mismatch: this prefill instance has {mine}, the puller {theirs}")]
        tid, hashes = str(pull.get("transfer_id")), [str(h) for h in pull.get("hashes", [])]
        if pull.get("backend") == "nixl":
            return self._descriptors(tid, hashes)
        held = self.held.take(tid)
        if held is None:
            return [_header(False, f"unknown or expired transfer id {tid!r}")]
        try:
            return self._blocks(held, hashes)
        finally:
            self.held.done(held)

    def _descriptors(self, tid: str, hashes: list[str]) -> list:
        """A NIXL pull: where the held blocks are (the hold stays until ``release``)."""
        if self.nixl is None:
            return [_header(False, "this prefill instance has no NIXL agent (--kv-transfer-backend nixl)")]
        held = self.held.peek(tid)
        if held is None:
            return [_header(False, f"unknown or expired transfer id {tid!r}")]
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
            return [_header(True, "", 0), *(b"" for _ in self.caches)]
        idx = to_device(torch.tensor(held.blocks[first:first + n]), self.caches[0].device)
        layers = [c.index_select(0, idx).cpu().contiguous() for c in self.caches]
        return [_header(True, "", n), *(t.view(torch.uint8).numpy() for t in layers)]

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


def _header(ok: bool, error: str, num_blocks: int = 0) -> bytes:
    return msgpack.packb({"ok": ok, "error": error, "num_blocks": num_blocks}, use_bin_type=True)
