"""Clients of the moeserve token RPC (ZeroMQ DEALER, msgpack; docs/protocol.md).

``Client`` is synchronous; ``AsyncClient`` is for asyncio (``moeserve.client.run`` uses uvloop when it is
installed). Both stream the protocol's frames as dicts (``type`` "token", then one "final") and raise
``RpcError`` for an "error" frame. ``complete`` returns a whole ``Completion``.

    from moeserve.client import Client
    with Client("tcp://127.0.0.1:5555") as c:
        for frame in c.generate("def fib(n):", max_tokens=32, temperature=0):
            print(frame.get("text_delta", ""), end="", flush=True)
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

T = TypeVar("T")
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


class RpcError(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, Any] | None = None
    logprobs: list[float] = field(default_factory=list)
    expert_ids: list[Any] = field(default_factory=list)
    reasoning: str = ""  # with return_fields=["reasoning"]: the reasoning and the answer apart
    content: str = ""

    def add(self, frame: dict[str, Any]) -> None:
        self.reasoning += frame.get("reasoning_delta", "") + frame.get("reasoning", "")
        self.content += frame.get("content_delta", "") + frame.get("content", "")
        if frame["type"] == "token":
            self.text += frame.get("text_delta", "")
            self.token_ids += frame.get("token_ids", [])
            self.logprobs += frame.get("logprobs", [])
            self.expert_ids += frame.get("expert_ids", [])
            return
        self.finish_reason, self.usage = frame.get("finish_reason"), frame.get("usage", {})
        self.timings = frame.get("timings")
        if "text" in frame:  # non-streaming: the final frame carries everything
            self.text, self.token_ids = frame["text"], frame.get("output_token_ids", [])
            self.logprobs, self.expert_ids = frame.get("logprobs", []), frame.get("expert_ids", [])


def generate_message(request_id: str, prompt: str | None, token_ids: Sequence[int] | None, stream: bool,
                     return_fields: Sequence[str], resumable: bool, api_key: str | None,
                     params: dict[str, Any]) -> dict[str, Any]:
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt and token_ids")
    msg: dict[str, Any] = {"v": 1, "type": "generate", "request_id": request_id, "params": params,
                           "stream": stream, "return": list(return_fields), "resumable": resumable}
    if prompt is not None:
        msg["prompt"] = prompt
    else:
        msg["token_ids"] = list(token_ids or [])
    if api_key is not None:
        msg["api_key"] = api_key
    return msg


def _pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _check(frame: dict[str, Any]) -> dict[str, Any]:
    if frame.get("type") == "error":
        raise RpcError(frame.get("code", "?"), frame.get("message", ""), frame.get("request_id"))
    return frame


def _route(frame: dict[str, Any]) -> str | None:
    """Which stream a frame belongs to: its request id, "__pong__" for pongs, None for an error without one."""
    return "__pong__" if frame.get("type") == "pong" else frame.get("request_id")


class Client:
    """Synchronous client; several streams may be open at once (frames are sorted by request id)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, timeout_s: float = 300.0):
        self.address, self.api_key, self.timeout_ms = address, api_key, int(timeout_s * 1000)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self._pending: dict[str | None, deque[dict[str, Any]]] = defaultdict(deque)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def send(self, body: dict[str, Any]) -> None:
        self.sock.send(_pack(body))

    def _next(self, request_id: str | None) -> dict[str, Any]:
        while not self._pending[request_id]:
            if not self.sock.poll(self.timeout_ms):
                raise TimeoutError(f"no frame from {self.address} within {self.timeout_ms / 1000:.0f} s")
            frame = msgpack.unpackb(self.sock.recv(), raw=False)
            rid = _route(frame)
            if rid is None:  # an error about a frame without a usable request id: the one just sent
                _check(frame)
            self._pending[rid].append(frame)
        return self._pending[request_id].popleft()

    def _frames(self, request_id: str) -> Iterator[dict[str, Any]]:
        while True:
            frame = _check(self._next(request_id))
            yield frame
            if frame["type"] == "final":
                self._pending.pop(request_id, None)
                return

    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *, stream: bool = True,
                 return_fields: Sequence[str] = (), request_id: str | None = None, resumable: bool = False,
                 **params: Any) -> Iterator[dict[str, Any]]:
        """Token frames, then the final frame. ``params``: SamplingParams fields (max_tokens, temperature...)."""
        rid = request_id or uuid.uuid4().hex
        self.send(generate_message(rid, prompt, token_ids, stream, return_fields, resumable, self.api_key, params))
        return self._frames(rid)

    def complete(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, **kw: Any) -> Completion:
        frames = self.generate(prompt, token_ids, **kw)
        result = Completion(request_id="")
        for frame in frames:
            result.request_id = frame["request_id"]
            result.add(frame)
        return result

    def resume(self, request_id: str, last_seq: int) -> Iterator[dict[str, Any]]:
        """Re-attach to a resumable request (from any connection) and get every frame after ``last_seq``."""
        self.send(self._auth({"v": 1, "type": "resume", "request_id": request_id, "last_seq": last_seq}))
        return self._frames(request_id)

    def abort(self, request_id: str) -> None:
        self.send(self._auth({"v": 1, "type": "abort", "request_id": request_id}))

    def ping(self) -> dict[str, Any]:
        self.send(self._auth({"v": 1, "type": "ping", "nonce": 1}))
        return _check(self._next("__pong__"))

    def _auth(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.api_key is not None:
            body["api_key"] = self.api_key
        return body


class AsyncClient:
    """asyncio client: many concurrent streams over one socket, dispatched by request id."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None):
        self.address, self.api_key = address, api_key
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close(linger=0)
        self.ctx.term()

    async def _read(self) -> None:
        while True:
            frame = msgpack.unpackb(await self.sock.recv(), raw=False)
            queue = self._queues.get(_route(frame) or "__pong__")
            if queue is not None:
                queue.put_nowait(frame)

    def _open(self, rid: str) -> asyncio.Queue:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        return queue

    async def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                       stream: bool = True, return_fields: Sequence[str] = (), request_id: str | None = None,
                       resumable: bool = False, **params: Any) -> AsyncIterator[dict[str, Any]]:
        rid = request_id or uuid.uuid4().hex
        msg = generate_message(rid, prompt, token_ids, stream, return_fields, resumable, self.api_key, params)
        queue = self._open(rid)
        finished = False
        try:
            await self.sock.send(_pack(msg))
            while not finished:
                frame = _check(await queue.get())
                finished = frame["type"] == "final"
                yield frame
        finally:
            self._queues.pop(rid, None)
            if not finished:  # the caller stopped early: abort on the server
                body = {"v": 1, "type": "abort", "request_id": rid}
                if self.api_key is not None:
                    body["api_key"] = self.api_key
                await self.sock.send(_pack(body))

    async def complete(self, prompt: str | None = None, token_ids: Sequence[int] | None = None,
                       **kw: Any) -> Completion:
        result = Completion(request_id="")
        async for frame in self.generate(prompt, token_ids, **kw):
            result.request_id = frame["request_id"]
            result.add(frame)
        return result

    async def ping(self) -> dict[str, Any]:
        queue = self._open("__pong__")
        body: dict[str, Any] = {"v": 1, "type": "ping", "nonce": 1}
        if self.api_key is not None:
            body["api_key"] = self.api_key
        await self.sock.send(_pack(body))
        return _check(await queue.get())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` with uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
