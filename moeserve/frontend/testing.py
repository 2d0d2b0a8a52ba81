"""Real servers for tests and benchmarks: in a background thread of this process, or a ``moeserve serve``
subprocess, on free ports."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from moeserve.frontend.server import Server
from moeserve.frontend.server_config import ServerConfig


class BackgroundServer:
    """``with BackgroundServer(config) as s:`` -> ``s.http_url``, ``s.rpc_address``, ``s.server``.

    Waits until the server is ready (a real one-token generation worked). ``call(coro)`` runs a coroutine on
    the server's loop (to read engine state from the thread that owns it)."""

    def __init__(self, config: ServerConfig, ready_timeout_s: float = 300.0):
        self.config = config
        self.ready_timeout_s = ready_timeout_s
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self.server = self.call(self._start())
        return self

    async def _start(self) -> Server:
        server = Server(self.config)
        await server.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        while server.service.state != "ready":
            if server.load_error is not None:
                raise RuntimeError(f"server failed to load: {server.load_error}")
            if loop.time() > deadline:
                raise TimeoutError("server not ready in time")
            await asyncio.sleep(0.02)
        return server

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout or self.ready_timeout_s)

    @property
    def http_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def rpc_address(self) -> str:
        assert self.server is not None
        return self.server.rpc_address

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.call(self.server.stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_subprocess(*args: str, timeout_s: float = 120.0, poll_s: float = 0.2,
                     **popen: Any) -> tuple[subprocess.Popen, str, str]:
    """Start ``moeserve serve ARGS`` on free ports; once ``/health`` answers 200 (asked every ``poll_s``),
    return (the process, the HTTP base URL, the RPC address). A server that exits first, or is not healthy
    within ``timeout_s``, is an error (with its stderr, when ``popen`` pipes it)."""
    import httpx

    port, rpc = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moeserve.launch.cli", "serve", "--port", str(port),
                             "--rpc-port", str(rpc), *args], **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moeserve serve exited with code {proc.returncode}: "
                               f"{proc.communicate()[1] or ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, f"tcp://127.0.0.1:{rpc}"
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    proc.kill()
    raise TimeoutError(f"moeserve serve was not healthy within {timeout_s:.0f} s")


def rank_pids(server_pid: int) -> dict[int, int]:
    """The live stage worker processes under a server (or a node's launcher): rank -> pid, of the newest
    generation (fault-injection tests and benchmarks kill them)."""
    import json

    import psutil

    found: dict[int, tuple[int, int]] = {}  # rank -> (generation, pid)
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
            if child.status() == psutil.STATUS_ZOMBIE or "moeserve.stages.worker" not in cmd:
                continue
        except psutil.Error:  # gone meanwhile
            continue
        spec = json.loads(cmd[-1])
        if spec["rank"] not in found or found[spec["rank"]][0] < spec["generation"]:
            found[spec["rank"]] = (spec["generation"], child.pid)
    return {rank: pid for rank, (_, pid) in sorted(found.items())}
