"""AsyncEngine: an asyncio face on the engine. The engine loop runs in its own thread; each request gets an
async stream of outputs. Dropping a stream early (client gone, task cancelled) aborts the request, which frees
its cache blocks at once.

The loop reads as numbered steps: receive commands -> step (schedule, run, sample, process) -> publish.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator

from moeserve.coordinator.engine import Engine
from moeserve.coordinator.outputs import RequestOutput
from moeserve.coordinator.request import RequestError
from moeserve.coordinator.sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

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

    # ---- the engine thread ----
    def _run(self) -> None:
        while not self._stopping:
            self._receive()                                     # 1. receive adds and aborts
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()                    # 2. schedule, run, sample, process
            except Exception as e:  # noqa: BLE001 - a failed step fails every request in flight
                self._fail_all(e)
                continue
            for out in outputs:                                 # 3. publish
                self._publish(out.request_id, out)

    def _receive(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                try:
                    self.engine.add_request(rid, prompt_token_ids=ids, params=params)
                except RequestError as e:
                    self._publish(rid, e)
            else:
                self.engine.abort(cmd[1])

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._publish(rid, RuntimeError(f"engine step failed: {error}"))

    def _publish(self, rid: str, item: RequestOutput | Exception) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, rid, item)

    def _deliver(self, rid: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.put_nowait(item)

    # ---- the asyncio side ----
    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Raises RequestError at once for a request that cannot run."""
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None or self.engine.tokenizer is None:
                raise RequestError("a request needs prompt_token_ids, or a prompt and a tokenizer")
            prompt_token_ids = self.engine.tokenizer.encode(prompt)
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.engine._validate(prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, list(prompt_token_ids), params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()
