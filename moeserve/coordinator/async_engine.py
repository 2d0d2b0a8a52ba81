"""AsyncEngine: an asyncio face on the engine. The engine loop (an ``EngineDriver``,
coordinator/engine_driver.py) runs in its own thread; each request gets an async stream of outputs. Dropping a
stream early (client gone, task cancelled) aborts the request, which frees its cache blocks at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

from moeserve.coordinator.engine import Engine
from moeserve.coordinator.engine_driver import EngineDriver, EngineSnapshot, EngineUpdate
from moeserve.coordinator.executor import WorkerError
from moeserve.coordinator.outputs import RequestOutput
from moeserve.coordinator.request import RequestError
from moeserve.coordinator.sampling import SamplingParams


async def updates_until_finished(queue: asyncio.Queue, forget: Callable[[], object],
                                 abort: Callable[[], object]) -> AsyncGenerator[EngineUpdate, None]:
    """Yield one request's updates from ``queue`` until the finished one; an Exception item is raised.
    Always ``forget`` the stream at the end, and ``abort`` the request when its consumer stopped early."""
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, Exception):
                finished = True
                raise item
            finished = item.output.finished
            yield item
    finally:
        forget()
        if not finished:
            abort()


class EngineLoopError(RuntimeError):
    """The engine loop stopped on an error: every request it held, and every later one, fails with this (the
    front end's typed ``engine_error``). ``cause`` names the error in one line."""

    def __init__(self, cause: str, retryable: bool = False):
        super().__init__(f"the engine failed: {cause}")
        self.cause = cause
        self.retryable = retryable  # a rank failed (the hardware, not the request): another server may serve it

    @classmethod
    def of(cls, error: BaseException) -> EngineLoopError:
        if isinstance(error, EngineLoopError):
            return cls(error.cause, error.retryable)
        loop_error = cls(f"{type(error).__name__}: {error}", isinstance(error, WorkerError))
        loop_error.__cause__ = error
        return loop_error


class AsyncEngine:
    def __init__(self, engine: Engine, fault_after_steps: int | None = None):
        """``fault_after_steps``: the test fault injection (engine_driver.injected_fault_steps)."""
        self.engine = engine
        self.driver = EngineDriver(engine, self._publish, fault_after_steps)
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: EngineLoopError | None = None  # set (in the engine thread) once the loop has failed
        # called on the event loop once the loop has failed, after every request it held was failed
        self.on_fatal: Callable[[EngineLoopError], None] | None = None

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def snapshot(self) -> EngineSnapshot:
        return self.driver.snapshot

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.driver.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.driver.check_workers()
                    continue
                self.driver.run_once()
        except Exception as e:  # noqa: BLE001 - whatever raises stops the loop; every request hears why
            # NOTE: set before _failed runs on the event loop, so a new stream() sees one or the other
            self.error = EngineLoopError.of(e)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._failed, self.error)
            except RuntimeError:  # the event loop is closed: nobody is waiting
                pass

    def _failed(self, error: EngineLoopError) -> None:
        """On the event loop: fail every request (those not yet added to the engine too), then say so."""
        for stream in self._streams.values():
            stream.put_nowait(EngineLoopError.of(error))
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _publish(self, batch: list[tuple[str, EngineUpdate | Exception]]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)  # one hop per step, not per request
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self, batch: list[tuple[str, EngineUpdate | Exception]]) -> None:
        for rid, item in batch:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    # ---- the asyncio side ----
    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     trace_experts: bool = False) -> AsyncIterator[EngineUpdate]:
        """Stream the updates of one request. Raises RequestError at once for a request that cannot run, and
        EngineLoopError (at once, or while it runs) once the engine loop has failed."""
        if self.error is not None:
            raise EngineLoopError.of(self.error)
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.engine._validate(prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self.driver.add(request_id, list(prompt_token_ids), params, trace_experts)
        self._wake.set()
        async with aclosing(updates_until_finished(stream, lambda: self._streams.pop(request_id, None),
                                                   lambda: self.abort(request_id))) as updates:
            async for item in updates:  # closed at once (the abort runs) when our consumer stops early
                yield item

    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Raises RequestError at once for a request that cannot run."""
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None or self.engine.tokenizer is None:
                raise RequestError("a request needs prompt_token_ids, or a prompt and a tokenizer")
            prompt_token_ids = self.engine.tokenizer.encode(prompt)
        async for update in self.stream(request_id, prompt_token_ids, params):
            yield update.output

    def abort(self, request_id: str) -> None:
        self.driver.abort(request_id)
        self._wake.set()
