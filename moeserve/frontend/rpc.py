"""The ZeroMQ token RPC server: a ROUTER socket, one msgpack message per frame (docs/protocol.md).

Each request streams through its own bounded buffer of encoded frames. Sends never block: a peer that does
not read (ZeroMQ's high-water mark reached) keeps its frames in its buffer and is retried, so it delays
nobody else; one that falls a whole buffer behind is aborted (``slow_consumer``). A peer that is gone
(``EHOSTUNREACH`` under ROUTER_MANDATORY) has its request aborted at once, unless the request is resumable:
then it waits up to ``resume_grace_s`` for a ``resume`` from a new connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
import zmq.asyncio

from moeserve.frontend.auth import ApiKeys
from moeserve.frontend.errors import BadFrame, BadRequest, FrontendError, NotFound, SlowConsumer
from moeserve.frontend.limits import Ticket
from moeserve.frontend.protocol import (
    Abort,
    ClientMessage,
    Generate,
    Ping,
    Resume,
    decode_client_message,
    error_frame,
    final_frame,
    pack,
    pong_frame,
    token_frame,
)
from moeserve.frontend.reasoning import ReasoningStream, prompt_opens_reasoning, reasoning_final
from moeserve.frontend.rpc_frames import final_extra, token_extra, usage_counts
from moeserve.frontend.service import (
    FinalEvent,
    GenerateRequest,
    GenerationService,
    TokenEvent,
    sampling_params,
)

logger = logging.getLogger(__name__)
FLUSH_INTERVAL_S = 0.005


@dataclass(eq=False)
class RpcStream:
    key: tuple[str | None, str]  # (key id, client request id)
    identity: bytes | None  # the connection frames go to; None while detached
    resumable: bool
    buffer: deque[tuple[int, bytes]] = field(default_factory=deque)  # (seq, frame), oldest first
    next_seq: int = 0
    sent_seq: int = -1  # frames up to here went to ``identity``
    task: asyncio.Task | None = None
    done: bool = False
    detached_at: float | None = None
    abort_reason: FrontendError | None = None


class RpcServer:
    def __init__(self, service: GenerationService, keys: ApiKeys, address: str,
                 reasoning_parser: str | None = None):
        self.service = service
        self.reasoning_parser = reasoning_parser
        self.keys = keys
        self.address = address
        self.limits = service.limits
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10000)
        # NOTE: frames up to 8x the limit get a typed frame_too_large reply; past that ZeroMQ drops the peer
        self.sock.setsockopt(zmq.MAXMSGSIZE, 8 * self.limits.max_frame_bytes)
        self._streams: dict[tuple[str | None, str], RpcStream] = {}
        self._blocked: set[RpcStream] = set()
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count()

    async def start(self) -> None:
        self.sock.bind(self.address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks = [asyncio.create_task(self._recv_loop(), name="rpc-recv"),
                       asyncio.create_task(self._maintain_loop(), name="rpc-maintain")]

    async def stop(self) -> None:
        for st in list(self._streams.values()):
            if st.task is not None:
                st.task.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *(s.task for s in self._streams.values() if s.task),
                             return_exceptions=True)
        self.sock.close(linger=0)
        self.ctx.term()

    @property
    def num_streams(self) -> int:
        return sum(1 for s in self._streams.values() if not s.done)

    # ---- receiving ----
    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            identity, body = frames[0], frames[1:]
            msg: ClientMessage | None = None
            try:
                if len(body) != 1:
                    raise BadFrame(f"one msgpack frame per message, got {len(body)}")
                msg = decode_client_message(body[0], self.limits.max_frame_bytes)
                self._handle(identity, msg)
            except FrontendError as e:
                self.service.refused(e, "rpc")
                rid = e.request_id or getattr(msg, "request_id", None)
                self._reply(identity, error_frame(e.code, e.message, rid))
            except Exception as e:  # noqa: BLE001 - whatever a frame does, the server keeps serving
                logger.exception("rpc: unexpected error handling a frame")
                self._reply(identity, error_frame("internal", f"internal error: {type(e).__name__}"))

    def _handle(self, identity: bytes, msg: ClientMessage) -> None:
        kid = self.keys.check(msg.api_key)
        if isinstance(msg, Ping):
            self._reply(identity, pong_frame(msg.nonce, self.service.state == "ready"))
        elif isinstance(msg, Generate):
            self._start(identity, msg, kid)
        elif isinstance(msg, Abort):
            st = self._streams.get((kid, msg.request_id))
            if st is None or st.done or st.task is None:
                raise NotFound(f"no running request {msg.request_id!r}", "request_id", msg.request_id)
            st.identity = identity if st.identity is None else st.identity
            st.task.cancel()
        elif isinstance(msg, Resume):
            self._resume(identity, msg, kid)

    def _start(self, identity: bytes, msg: Generate, kid: str | None) -> None:
        key = (kid, msg.request_id)
        old = self._streams.get(key)
        if old is not None and not old.done:
            raise BadRequest(f"request id {msg.request_id!r} is already running", "request_id", msg.request_id)
        params = sampling_params(msg.params, prefix="params.")
        if "logprobs" in msg.return_fields and params.logprobs is None:  # the chosen tokens' log-probs, at least
            params = replace(params, logprobs=0)
        if "reasoning" in msg.return_fields and self.reasoning_parser is None:
            raise BadRequest("return 'reasoning' needs a server started with --reasoning-parser", "return",
                             msg.request_id)
        ids = list(msg.token_ids) if msg.token_ids is not None else self.service.tokenize(msg.prompt or "")
        engine_id = f"rpc-{next(self._ids)}"
        req = self.service.prepare(engine_id, ids, params, trace_experts="expert_trace" in msg.return_fields,
                                   key_id=kid, protocol="rpc")
        ticket = self.service.admit([req])
        st = RpcStream(key, identity, msg.resumable,
                       buffer=deque(maxlen=self.limits.stream_buffer_frames))
        self._streams[key] = st
        st.task = asyncio.create_task(self._run(st, msg, req, ticket))

    def _resume(self, identity: bytes, msg: Resume, kid: str | None) -> None:
        st = self._streams.get((kid, msg.request_id))
        if st is None or not st.resumable:
            raise NotFound(f"no resumable request {msg.request_id!r}", "request_id", msg.request_id)
        first = st.buffer[0][0] if st.buffer else st.next_seq
        if msg.last_seq + 1 < first:
            raise NotFound(f"frames after seq {msg.last_seq} are no longer buffered (oldest is {first})",
                           "last_seq", msg.request_id)
        st.identity, st.sent_seq, st.detached_at = identity, min(msg.last_seq, st.next_seq - 1), None
        self._flush(st)

    # ---- one request ----
    async def _run(self, st: RpcStream, msg: Generate, req: GenerateRequest, ticket: Ticket) -> None:
        rid, fields = msg.request_id, set[str](msg.return_fields)
        collected: list[TokenEvent] = []  # non-streaming: what the final frame carries
        tokens = 0
        reasoning = self._reasoning(req) if "reasoning" in fields else None
        try:
            async for ev in self.service.generate(req, ticket):
                if isinstance(ev, FinalEvent):
                    extra = final_extra(ev, msg, req.prompt_token_ids, collected)
                    usage = usage_counts(ev.num_prompt_tokens, tokens)
                    if reasoning is not None:
                        extra.update(reasoning_final(reasoning, msg.stream))
                        usage["reasoning_tokens"] = reasoning.num_reasoning_tokens
                    self._emit(st, final_frame(rid, 0, ev.finish_reason, usage, extra))
                    continue
                tokens += len(ev.token_ids)
                extra = token_extra(ev, fields)
                if reasoning is not None:
                    split = reasoning.feed(ev.text_delta, len(ev.token_ids))
                    extra.update(reasoning_delta=split.reasoning, content_delta=split.content)
                if msg.stream:
                    self._emit(st, token_frame(rid, 0, ev.token_ids, ev.text_delta, extra))
                else:
                    collected.append(ev)
        except asyncio.CancelledError:
            reason = st.abort_reason
            if reason is not None:
                self._emit(st, error_frame(reason.code, reason.message, rid))
            else:
                self._emit(st, final_frame(rid, 0, "abort", usage_counts(len(req.prompt_token_ids), tokens)))
        except FrontendError as e:
            self._emit(st, error_frame(e.code, e.message, rid))
        finally:
            ticket.release()
            st.done = True
            if not st.resumable:
                self._streams.pop(st.key, None)
            elif st.detached_at is None:
                st.detached_at = time.monotonic()  # kept for a late resume until the grace period ends

    def _reasoning(self, req: GenerateRequest) -> ReasoningStream:
        """The reasoning split of one request; whether the prompt opened <think> is read from its tail."""
        tok = self.service.tokenizer
        tail = tok.decode(req.prompt_token_ids[-16:], skip_special_tokens=False) if tok is not None else ""
        return ReasoningStream(prompt_opens_reasoning(tail))

    def _emit(self, st: RpcStream, body: dict) -> None:
        if st.buffer.maxlen is not None and len(st.buffer) == st.buffer.maxlen and st.buffer[0][0] > st.sent_seq:
            if not st.done and st.task is not None and st.abort_reason is None:
                st.abort_reason = SlowConsumer(f"the reader fell {len(st.buffer)} frames behind; request aborted")
                st.task.cancel()
            return
        body["seq"] = st.next_seq
        st.buffer.append((st.next_seq, pack(body)))
        st.next_seq += 1
        self._flush(st)

    def _flush(self, st: RpcStream) -> None:
        while st.identity is not None and st.sent_seq + 1 < st.next_seq:
            seq = st.sent_seq + 1
            frame = st.buffer[seq - st.buffer[0][0]][1]
            err = self._send(st.identity, frame)
            if err == zmq.EAGAIN:
                self._blocked.add(st)
                return
            if err is not None:  # the peer is gone
                self._detach(st)
                return
            st.sent_seq = seq
        self._blocked.discard(st)
        if not st.resumable:
            while st.buffer and st.buffer[0][0] <= st.sent_seq:
                st.buffer.popleft()

    def _detach(self, st: RpcStream) -> None:
        st.identity = None
        self._blocked.discard(st)
        if not st.resumable:
            if st.task is not None and not st.done:
                st.task.cancel()  # client gone: abort now, which frees its cache blocks
        elif st.detached_at is None:
            st.detached_at = time.monotonic()

    def _send(self, identity: bytes, frame: bytes) -> int | None:
        """Send without blocking; returns None when sent, else the errno."""
        fut: Any = self.sock.send_multipart([identity, frame], flags=zmq.NOBLOCK, copy=False)
        exc = fut.exception() if fut.done() else None
        if exc is None:
            return None
        return exc.errno if isinstance(exc, zmq.ZMQError) else -1

    def _reply(self, identity: bytes, body: dict) -> None:
        self._send(identity, pack(body))  # a reply to a gone or saturated peer is dropped

    async def _maintain_loop(self) -> None:
        """Retry blocked streams; drop resumable streams whose client did not come back in time."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            for st in list(self._blocked):
                self._flush(st)
            now = time.monotonic()
            for st in [s for s in self._streams.values() if s.detached_at is not None]:
                if now - (st.detached_at or now) > self.limits.resume_grace_s:
                    if st.task is not None and not st.done:
                        st.task.cancel()
                    self._streams.pop(st.key, None)

