"""The front-end server: one event loop serving the OpenAI HTTP API (uvicorn) and the ZeroMQ token RPC over
the same ``GenerationService``, in front of one in-process engine or N replica processes.

Start-up order: HTTP and RPC listen at once (/health says 503 "loading"); the engines load; one real
one-token generation per replica must work; then the state is "ready". SIGTERM / SIGINT drain: new
requests get 503 while those in flight finish (up to ``drain_timeout_s``), then everything stops. If the
engine loop fails, the requests it held fail (engine_error), /health says 503 "failed" and new requests get
503 for ``failure_grace_s``, then the process exits non-zero after one error line naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
from typing import Any

import uvicorn
import zmq

from moeserve.coordinator.async_engine import EngineLoopError
from moeserve.coordinator.engine_driver import injected_fault_steps
from moeserve.coordinator.sampling import SamplingParams
from moeserve.dashboard import routes as expert_load_routes
from moeserve.errors import UserError
from moeserve.frontend.auth import ApiKeys, AuditLog
from moeserve.frontend.http_api import HttpApi
from moeserve.frontend.metrics import ServerMetrics
from moeserve.frontend.rpc import RpcServer
from moeserve.frontend.server_config import ServerConfig
from moeserve.frontend.service import GenerateRequest, GenerationService, ModelInfo
from moeserve.model.config import ModelConfig
from moeserve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the Server handles signals (to drain first)
        yield


class Server:
    def __init__(self, config: ServerConfig, engine: Any = None):
        """``engine``: an Engine that is already up (``moeserve launch cluster`` builds it across the nodes
        first); by default the server builds its own from ``config.engine``."""
        self.config = config
        self._prebuilt_engine = engine
        path = config.engine.model_path
        self.tokenizer = None if config.engine.skip_tokenizer_init else Tokenizer.from_dir(path)
        mc = ModelConfig.from_hf(path)
        model_len = config.engine.context_length(mc)
        info = ModelInfo(config.model_name, model_len, mc.vocab_size, config.engine.effective_block_size, 0)
        self.keys = ApiKeys.from_args(config.api_key)
        self.audit = AuditLog(config.audit_log)
        self.service = GenerationService(self.tokenizer, info, config.limits, ServerMetrics(self._snapshots),
                                         self.audit, config.routing)
        self.http = HttpApi(self.service, self.keys, config.model_name, config.reasoning_parser,
                            config.tool_call_parser)
        expert_load_routes.install(self.http.app, self.service, self.keys, config.expert_metrics)
        self.rpc = RpcServer(self.service, self.keys, f"tcp://{_zmq_host(config.host)}:{config.rpc_port}",
                             config.reasoning_parser)
        self._uvicorn: _Uvicorn | None = None
        self._tasks: list[asyncio.Task] = []
        self._engines: list = []  # AsyncEngine instances (replicas == 1)
        self._replica_set: Any = None
        self.stopped = asyncio.Event()
        self.load_error: BaseException | None = None
        self.engine_error: BaseException | None = None

    def _snapshots(self):
        return self.service.snapshots()

    @property
    def http_port(self) -> int:
        assert self._uvicorn is not None
        return self._uvicorn.servers[0].sockets[0].getsockname()[1]

    @property
    def rpc_address(self) -> str:
        return self.rpc.address

    async def start(self) -> None:
        if not self.config.is_loopback:
            logger.warning("listening on %s: reachable from other machines%s", self.config.host,
                           "" if self.keys.enabled else " WITHOUT an API key (--api-key)")
        cfg = uvicorn.Config(self.http.app, host=self.config.host, port=self.config.port, log_level="warning",
                             lifespan="off", access_log=False, backlog=4096, timeout_keep_alive=30)
        self._uvicorn = _Uvicorn(cfg)
        self._tasks.append(asyncio.create_task(self._uvicorn.serve(), name="http"))
        while not self._uvicorn.started:
            if self._tasks[0].done():
                self._tasks[0].result()
                raise RuntimeError("the HTTP server stopped during start")
            await asyncio.sleep(0.01)
        try:
            await self.rpc.start()
        except zmq.ZMQError as e:  # the port was taken after the command's own check
            raise UserError(f"--rpc-port: cannot listen on {self.rpc.address} ({e.strerror})") from e
        self._tasks.append(asyncio.create_task(self._load(), name="load"))

    async def _load(self) -> None:
        try:
            backends = await (self._start_replicas() if self.config.replicas > 1 else self._start_local())
            self.service.attach(backends)
            await self._warmup()
            if self.config.freeze_gc:
                gc.collect()
                gc.freeze()
            self.service.state = "ready"
            logger.info("moeserve ready: OpenAI API http://%s:%d/v1, token RPC %s",
                        _url_host(self.config.host), self.http_port, self.rpc_address)
        except BaseException as e:
            self.load_error = e
            logger.exception("loading the engine failed")
            self.stopped.set()
            raise

    async def _start_local(self) -> list:
        from moeserve.coordinator.async_engine import AsyncEngine
        from moeserve.coordinator.engine import Engine

        engine = self._prebuilt_engine or await asyncio.to_thread(Engine, self.config.engine)
        self._set_capacity(engine.kv.num_blocks)
        side = engine.prefill_side
        self.http.kv_transfer_info = {"mode": engine.config.disaggregation_mode, "fingerprint": engine.fingerprint,
                                      "backend": engine.config.kv_transfer_backend,
                                      "transfer_addr": side.address if side is not None else ""}
        ae = AsyncEngine(engine, injected_fault_steps())  # None unless a test sets the fault injection
        ae.on_fatal = self._engine_failed
        ae.start()
        self._engines.append(ae)
        return [ae]

    async def _start_replicas(self) -> list:
        from moeserve.frontend.replica import ReplicaSet

        cores = os.cpu_count() or 1
        threads = self.config.replica_threads or max(1, cores // self.config.replicas)
        engine = dataclasses.asdict(dataclasses.replace(self.config.engine, load_progress=False))
        self._replica_set = ReplicaSet(engine, self.config.replicas, threads, on_fatal=self._engine_failed)
        backends = await self._replica_set.start()
        self._set_capacity(self._replica_set.num_blocks)
        return backends

    def _engine_failed(self, error: EngineLoopError) -> None:
        """Whatever raised in the engine loop (a step, a stage worker gone, a bug): the requests it held have
        failed with engine_error; now /health turns 503 and new requests get 503 at once, and serve_forever
        ends the process after failure_grace_s. One line names the cause (with -v, its traceback too)."""
        verbose = logging.getLogger().isEnabledFor(logging.INFO)  # moeserve -v (ours is at INFO anyway)
        logger.error("%s; the server stops in %g s", error, self.config.failure_grace_s,
                     exc_info=error.__cause__ if verbose and error.__cause__ is not None else None)
        self.engine_error = error
        self.service.fail(str(error))
        self.stopped.set()

    def _set_capacity(self, num_blocks: int) -> None:
        info = self.service.model
        self.service.model = dataclasses.replace(info, capacity_tokens=num_blocks * info.block_size)

    async def _warmup(self) -> None:
        """/health turns 200 only after a real one-token generation worked on every replica."""
        bos = self.tokenizer.bos_token_id if self.tokenizer is not None else None
        ids = [bos if bos is not None else 0]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for i, backend in enumerate(self.service.backends):
            got = [u async for u in backend.stream(f"warmup-{i}", ids, params)]
            if not got or not got[-1].output.finished or len(got[-1].output.output_token_ids or []) != 1:
                raise RuntimeError(f"warm-up generation on replica {i} did not produce a token")

    async def drain(self) -> None:
        """Refuse new requests (503), let those in flight finish, up to drain_timeout_s."""
        self.service.state = "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while self.service.admission.num_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.rpc.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        for t in self._tasks:
            if t.get_name() == "load" and not t.done():
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ae in self._engines:
            await ae.stop()
            ae.engine.close()
        if self._replica_set is not None:
            await self._replica_set.stop()
        self.audit.close()
        self.stopped.set()

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (then drain and stop) or a failed load."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self.stopped.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if self.engine_error is not None:  # fail requests (done), say unhealthy (done), let /health be seen
            await asyncio.sleep(self.config.failure_grace_s)
        elif self.load_error is None:
            await self.drain()
        await self.stop()
        if self.load_error is not None:
            raise SystemExit(f"moeserve serve: loading failed: {self.load_error}")
        if self.engine_error is not None:
            raise SystemExit(1)  # the cause is the one line _engine_failed logged


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _zmq_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "*"
    return "127.0.0.1" if host == "localhost" else host


def run_server(config: ServerConfig, engine: Any = None) -> None:
    """Block serving ``config`` (uvloop when installed), over ``engine`` if one is given."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(Server(config, engine).serve_forever())
    else:
        uvloop.run(Server(config, engine).serve_forever())


__all__ = ["GenerateRequest", "Server", "ServerConfig", "run_server"]
