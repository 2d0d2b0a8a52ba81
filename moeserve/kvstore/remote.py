"""Instance-to-instance KV transfer over ZeroMQ (``--kv-transfer-backend zmq``): a prefill instance's
``KvTransferServer`` (kvstore/transfer_server.py) hands the latent blocks it holds for a transfer to the decode instance that pulls them
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


def header(ok: bool, error: str, num_blocks: int = 0) -> bytes:
    return msgpack.packb({"ok": ok, "error": error, "num_blocks": num_blocks}, use_bin_type=True)
