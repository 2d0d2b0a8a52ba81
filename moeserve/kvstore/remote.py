"""Instance-to-instance KV transfer, the decode side (``pull_remote_blocks``, run by each decode rank's
loader thread, kvstore/transport.py) and the wire; the prefill side is kvstore/transfer_server.py.

Wire (ZeroMQ DEALER -> ROUTER, msgpack maps; no tensor and no pickle in a control message):

1. ``resolve`` to the prefill instance's transfer address: the transfer id, the chain hashes of the blocks
   wanted (32 hex digits each) and the puller's model fingerprint and cache layout. The answer: the held
   blocks matching the hashes from the first (their block ids there) and the ``sources`` -- for each stage of
   the prefill instance, the address of its block server and its layer range.
2. ``read`` (``--kv-transfer-backend zmq``) to each source whose layers overlap this rank's: the block ids and
   the layers. The answer is a msgpack header and one raw frame per layer, ``[n, block_size, kv_dim]`` in the
   cache dtype, sent from the gathered tensor without a copy and read into the cache with
   ``torch.frombuffer``. With ``nixl``, ``descs`` instead: the answer carries the source's NIXL agent
   metadata and descriptors, and the bytes come by a NIXL read (kvstore/nixl_transfer.py).
3. ``release`` to the transfer address, from the decode coordinator once every rank has its layers: the hold
   goes.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
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
    """What both sides must agree on for the bytes to mean the same latents (the layers are asked apart)."""
    return {"fingerprint": layout.fingerprint, "dtype": layout.dtype, "block_size": layout.block_size,
            "kv_dim": layout.kv_dim}


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

class TransferFailed(RuntimeError):
    """A pull that did not work (refused, timed out, broken): the decode instance computes the prompt."""


def ask(addr: str, body: dict, deadline: float) -> list:
    """One request to a transfer server and its answer's frames (the header parsed, checked ok, first)."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(addr)
        sock.send(msgpack.packb(body, use_bin_type=True))
        if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            raise TransferFailed(f"no answer from {addr} in time")
        frames = sock.recv_multipart(copy=False)
    except zmq.ZMQError as e:
        raise TransferFailed(f"transfer from {addr} failed: {e}") from e
    finally:
        sock.close()
    try:
        head = msgpack.unpackb(frames[0].bytes, raw=False)
        ok, error = bool(head["ok"]), str(head.get("error", ""))
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        raise TransferFailed(f"malformed transfer header from {addr}: {e}") from e
    if not ok:
        raise TransferFailed(error or "refused")
    return [head, *frames[1:]]


def pull_remote_blocks(mover: BlockMover, msg: KvLoadMsg, nixl: NixlAgent | None = None) -> LoadReport:
    """Pull this rank's layers of the blocks of ``msg`` (its ``remote_*`` fields): ask the prefill instance
    which held blocks match and where their layers are, then read each overlapping stage's layers straight
    into this rank's cache (frames, or a NIXL read when ``msg.remote_backend`` is nixl). Returns how many
    blocks, from the first, arrived; a refusal, a timeout or a broken answer loads nothing."""
    deadline = time.monotonic() + msg.remote_timeout_s
    mine = layout_fields(mover.layout)
    try:
        head = ask(msg.remote_addr, {"op": "resolve", "transfer_id": msg.remote_id, "hashes": msg.remote_hashes,
                                     **mine}, deadline)[0]
        n = min(int(head["num_blocks"]), len(msg.remote_blocks))
        remote_blocks = [int(b) for b in head["blocks"][:n]]
        if n == 0:
            return LoadReport(0, 0, 0)
        start = mover.layout.layer_start
        end = start + mover.layout.num_layers
        covered, nbytes = 0, 0
        for addr, first, count in head["sources"]:
            lo, hi = max(int(first), start), min(int(first) + int(count), end)
            if lo >= hi:
                continue
            body = {"op": "descs" if msg.remote_backend == "nixl" else "read", "blocks": remote_blocks,
                    "layer_start": lo, "layer_end": hi, **mine}
            frames = ask(str(addr), body, deadline)
            layers = [mover.caches[mover.layers.index(i)] for i in range(lo, hi)]
            nbytes += _copy_in(layers, msg.remote_blocks[:n], frames) if msg.remote_backend != "nixl" else \
                _read_nixl(nixl, layers, msg.remote_blocks[:n], frames[0], deadline)
            covered += hi - lo
        if covered != end - start:
            raise TransferFailed(f"the prefill instance's stages do not cover layers {start}-{end}")
    except TransferFailed as e:
        return LoadReport(0, 0, 0, str(e))
    if mover.device.type != "cpu":  # the report says the blocks are in: let the copies land first
        landed = torch.Event(device=mover.device)
        landed.record()
        landed.synchronize()
    return LoadReport(n, nbytes, 0)


def _copy_in(layers: list[torch.Tensor], blocks: list[int], frames: list) -> int:
    n = len(blocks)
    per_layer = n * layers[0][0].numel() * layers[0].element_size()
    if len(frames) != 1 + len(layers) or any(len(f.buffer) != per_layer for f in frames[1:]):
        raise TransferFailed("the transfer's frames do not match the cache layout")
    idx = to_device(torch.tensor(blocks), layers[0].device)
    for cache, frame in zip(layers, frames[1:]):
        with warnings.catch_warnings():  # a read-only buffer: it is only copied from
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(frame.buffer, dtype=cache.dtype).view(n, *cache.shape[1:])
        cache.index_copy_(0, idx, to_device(src, cache.device))
    return per_layer * len(layers)


def _read_nixl(nixl: NixlAgent | None, layers: list[torch.Tensor], blocks: list[int], head: dict,
               deadline: float) -> int:
    if nixl is None:
        raise TransferFailed("a NIXL pull on a rank without a NIXL agent")
    descs = [[int(x) for x in d] for d in head.get("descs", [])]
    why = nixl.read(bytes(head.get("agent", b"")), descs, blocks, max(0.1, deadline - time.monotonic()), layers)
    if why:
        raise TransferFailed(why)
    return sum(d[1] for d in descs)


def send_release(sockets: dict[str, zmq.Socket], addr: str, transfer_id: str) -> None:
    """Tell a prefill instance its hold can go (no answer awaited; one DEALER per address, kept)."""
    sock = sockets.get(addr)
    if sock is None:
        sock = sockets[addr] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(addr)
    try:
        sock.send(msgpack.packb({"op": "release", "transfer_id": transfer_id}, use_bin_type=True), zmq.NOBLOCK)
    except zmq.ZMQError:
        pass  # the hold expires instead


def header(ok: bool, error: str, num_blocks: int = 0) -> bytes:
    return msgpack.packb({"ok": ok, "error": error, "num_blocks": num_blocks}, use_bin_type=True)
