"""Data-parallel replicas as processes: each runs its own ``Engine`` behind an ``EngineDriver`` and talks to
the front end over ZeroMQ (ipc) with msgpack maps -- never pickle.

front end -> replica (PUSH, one per replica): ``add`` {request_id, token_ids, params, trace}, ``abort``
{request_id}, ``rebalance``, ``stop``. replica -> front end (one shared PULL): ``ready`` {index, num_blocks,
block_size}, ``updates`` {index, items: [[request_id, update | {error}]], snapshot}, ``snapshot``,
``expert_load`` {index, view} (each new window, ``load_view_codec``), ``failed`` {message}
(at start, or when its loop raised: the front end then fails the replica's requests and stops).
``ReplicaBackend`` gives the front end the same ``stream`` interface as ``AsyncEngine``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from moeserve.coordinator.async_engine import EngineLoopError, updates_until_finished
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.engine_driver import (
    EngineDriver,
    EngineSnapshot,
    EngineUpdate,
    injected_fault_steps,
)
from moeserve.coordinator.executor import WorkerError
from moeserve.coordinator.expert_load import LoadView
from moeserve.coordinator.load_view_codec import ViewReporter, decode_view
from moeserve.coordinator.outputs import RequestOutput
from moeserve.coordinator.request import RequestError
from moeserve.coordinator.sampling import SamplingParams
from moeserve.coordinator.supervisor import StreamInterrupted
from moeserve.cpu_runtime import shared_cores_env


def _pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _unpack(frame: bytes) -> dict[str, Any]:
    # NOTE: a trusted internal channel; int map keys carry top logprobs (token id -> logprob)
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def encode_item(item: EngineUpdate | Exception) -> dict[str, Any]:
    if isinstance(item, Exception):
        return {"error": str(item), "request_error": isinstance(item, RequestError),
                "interrupted": isinstance(item, StreamInterrupted)}
    return {"output": dataclasses.asdict(item.output), "queue_s": item.queue_s, "expert_ids": item.expert_ids}


def decode_item(body: dict[str, Any]) -> EngineUpdate | Exception:
    if "error" in body:
        if body["request_error"]:
            return RequestError(body["error"])
        return StreamInterrupted(body["error"]) if body.get("interrupted") else RuntimeError(body["error"])
    return EngineUpdate(RequestOutput(**body["output"]), body["queue_s"], body["expert_ids"])


def _send_nowait(sock: zmq.asyncio.Socket, body: dict[str, Any]) -> None:
    """Send without waiting; a replica that is gone (EAGAIN: no peer) just does not get it."""
    try:
        sent = asyncio.ensure_future(sock.send(_pack(body), flags=zmq.NOBLOCK))
    except zmq.ZMQError:
        return
    sent.add_done_callback(lambda f: f.cancelled() or f.exception())  # NOTE: the error is read, not logged


# ---- the replica process ----

def replica_main(spec: dict[str, Any]) -> int:
    import torch

    from moeserve.coordinator.config import EngineConfig

    torch.set_num_threads(spec["num_threads"])
    ctx = zmq.Context()
    commands, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    commands.connect(spec["cmd_addr"])
    out.connect(spec["out_addr"])
    index = spec["index"]
    try:
        engine = Engine(EngineConfig(**spec["engine"]))
    except Exception as e:  # noqa: BLE001 - reported to the front end, which fails the start
        out.send(_pack({"type": "failed", "index": index, "message": f"{type(e).__name__}: {e}"}))
        return 1
    out.send(_pack({"type": "ready", "index": index, "num_blocks": engine.kv.num_blocks,
                    "block_size": engine.kv.block_size}))
    try:
        return _serve(engine, commands, out, index)
    except Exception as e:  # noqa: BLE001 - whatever raises: the front end fails our requests and stops
        out.send(_pack({"type": "failed", "index": index, "message": f"{type(e).__name__}: {e}",
                        "retryable": isinstance(e, WorkerError)}))
        return 1
    finally:
        engine.close()
        ctx.destroy(linger=0)


def _serve(engine: Engine, commands: zmq.Socket, out: zmq.Socket, index: int) -> int:
    """The replica's loop: commands in, the driver's updates out (every 0.5 s at least, with its snapshot).
    Returns 0 on ``stop`` or when the front end is gone; raises whatever the loop raises."""
    pending: list[list[Any]] = []
    def recovering(snapshot: EngineSnapshot) -> None:  # before the restart blocks the loop: /health says so
        out.send(_pack({"type": "updates", "index": index, "items": [], "snapshot": dataclasses.astuple(snapshot)}))

    driver = EngineDriver(engine, lambda batch: pending.extend([rid, encode_item(x)] for rid, x in batch),
                          injected_fault_steps(), recovering)  # None unless a test sets the fault injection
    parent, last_report = os.getppid(), 0.0
    load = ViewReporter(engine)  # the replica's expert load, for the front end's /metrics and dashboard
    while True:
        if commands.poll(0 if driver.has_work() else 100):
            while commands.poll(0):
                cmd = _unpack(commands.recv())
                if cmd["type"] == "stop":
                    return 0
                if cmd["type"] == "add":
                    driver.add(cmd["request_id"], cmd["token_ids"], SamplingParams.from_dict(cmd["params"]),
                               cmd["trace"])
                elif cmd["type"] == "rebalance":
                    load.request_rebalance()
                else:
                    driver.abort(cmd["request_id"])
        if driver.has_work():
            driver.run_once()
        now = time.monotonic()
        if pending or now - last_report > 0.5:
            out.send(_pack({"type": "updates", "index": index, "items": pending,
                            "snapshot": dataclasses.astuple(driver.snapshot)}))
            pending.clear()
            last_report = now
            view = load.poll(idle=not driver.has_work())
            if view is not None:
                out.send(_pack({**view, "index": index}))
            if os.getppid() != parent:
                return 0  # the front end is gone


# ---- the front end's side ----

class ReplicaBackend:
    def __init__(self, index: int, sock: zmq.asyncio.Socket, proc: subprocess.Popen):
        self.index = index
        self.sock = sock
        self.proc = proc
        self.snapshot = EngineSnapshot()
        self.streams: dict[str, asyncio.Queue] = {}
        self.error: EngineLoopError | None = None  # the replica failed: its requests and later ones get this
        self.load_view: LoadView | None = None  # the replica's latest expert load (``expert_load`` messages)

    def _send(self, body: dict[str, Any]) -> None:
        _send_nowait(self.sock, body)

    def request_rebalance(self) -> None:
        """Ask the replica's engine for an expert rebalance (POST /admin/rebalance)."""
        self._send({"type": "rebalance"})

    def deliver(self, items: list[list[Any]]) -> None:
        for rid, body in items:
            stream = self.streams.get(rid)
            if stream is not None:
                stream.put_nowait(decode_item(body))

    def fail(self, error: EngineLoopError) -> None:
        self.error = error
        for stream in self.streams.values():
            stream.put_nowait(EngineLoopError.of(error))

    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     trace_experts: bool = False) -> AsyncIterator[EngineUpdate]:
        if self.error is not None:
            raise EngineLoopError.of(self.error)
        if request_id in self.streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        if self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.index} exited with code {self.proc.returncode}")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        self._send({"type": "add", "request_id": request_id, "token_ids": list(prompt_token_ids),
                    "params": dataclasses.asdict(params), "trace": trace_experts})
        async with aclosing(updates_until_finished(
                queue, lambda: self.streams.pop(request_id, None),
                lambda: self._send({"type": "abort", "request_id": request_id}))) as updates:
            async for item in updates:  # closed at once (the abort is sent) when our consumer stops early
                yield item


class ReplicaSet:
    """Spawns ``count`` replica processes and routes their messages to ``ReplicaBackend``s. A replica whose
    loop failed (or that exited) fails its requests, then ``on_fatal`` is called, as AsyncEngine's."""

    def __init__(self, engine: dict[str, Any], count: int, num_threads: int,
                 on_fatal: Callable[[EngineLoopError], None] | None = None):
        self.engine, self.count, self.num_threads = engine, count, num_threads
        self.on_fatal = on_fatal
        self.ctx = zmq.asyncio.Context()
        self.tmp = tempfile.mkdtemp(prefix="moeserve-replicas-")
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(f"ipc://{self.tmp}/out")
        self.backends: list[ReplicaBackend] = []
        self.num_blocks = 0
        self._reader: asyncio.Task | None = None

    async def start(self, timeout_s: float = 600.0) -> list[ReplicaBackend]:
        for i in range(self.count):
            sock = self.ctx.socket(zmq.PUSH)
            sock.bind(f"ipc://{self.tmp}/cmd-{i}")
            spec = {"index": i, "engine": self.engine, "cmd_addr": f"ipc://{self.tmp}/cmd-{i}",
                    "out_addr": f"ipc://{self.tmp}/out", "num_threads": self.num_threads}
            proc = subprocess.Popen([sys.executable, "-m", "moeserve.frontend.replica", json.dumps(spec)],
                                    env=os.environ | shared_cores_env(os.environ, self.count))
            self.backends.append(ReplicaBackend(i, sock, proc))
        ready: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.count:
            dead = [b.index for b in self.backends if b.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"replica(s) {dead} exited during start" if dead else "replicas did not start")
            if await self.inbox.poll(500):
                msg = _unpack(await self.inbox.recv())
                if msg["type"] == "failed":
                    await self.stop()
                    raise RuntimeError(f"replica {msg['index']} failed to start: {msg['message']}")
                if msg["type"] == "ready":
                    ready.add(msg["index"])
                    self.num_blocks, self.block_size = msg["num_blocks"], msg["block_size"]
        self._reader = asyncio.create_task(self._read())
        return self.backends

    async def _read(self) -> None:
        while True:
            if not await self.inbox.poll(500):
                dead = next((b for b in self.backends if b.error is None and b.proc.poll() is not None), None)
                if dead is not None:  # killed, or gone without a word
                    self._failed(dead, f"replica {dead.index} exited with code {dead.proc.returncode}")
                continue
            msg = _unpack(await self.inbox.recv())
            backend = self.backends[msg["index"]]
            if msg["type"] == "updates":
                backend.snapshot = EngineSnapshot(*msg["snapshot"])
                backend.deliver(msg["items"])
            elif msg["type"] == "expert_load":
                backend.load_view = decode_view(msg["view"])
            elif msg["type"] == "failed" and backend.error is None:
                self._failed(backend, f"replica {backend.index}: {msg['message']}", msg.get("retryable", False))

    def _failed(self, backend: ReplicaBackend, cause: str, retryable: bool = False) -> None:
        error = EngineLoopError(cause, retryable)
        backend.fail(error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for b in self.backends:
            if b.proc.poll() is None:
                _send_nowait(b.sock, {"type": "stop"})
        for b in self.backends:
            try:
                await asyncio.to_thread(b.proc.wait, 10)
            except subprocess.TimeoutExpired:
                b.proc.kill()
        self.ctx.destroy(linger=0)


if __name__ == "__main__":
    sys.exit(replica_main(json.loads(sys.argv[1])))
