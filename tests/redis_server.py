"""A real ``redis-server`` for tests: on a free port of this machine (or in a network namespace), no
persistence, stopped by the test. ``RedisServer.unavailable()`` says why not where it is not installed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None,
                 bind: str = "127.0.0.1", prefix: list[str] | None = None, io_threads: int = 1):
        """``prefix``: a command prefix (``ip netns exec NAME``) to run it on another host; ``io_threads``:
        redis-server's threads for socket reads and writes (its default, 1, serves every client from one)."""
        self.workdir, self.port, self.password, self.bind = workdir, port or free_port(), password, bind
        self.prefix = prefix or []
        self.io_threads = io_threads
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def unavailable() -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (scripts/test_services.sh installs it when run as root)"
        return None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.bind}:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", self.bind, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru",
                "--protected-mode", "no", "--enable-debug-command", "local"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.io_threads > 1:
            args += ["--io-threads", str(self.io_threads), "--io-threads-do-reads", "yes"]
        self.proc = subprocess.Popen([*self.prefix, *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            if self._answers():
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer in time")

    def _answers(self) -> bool:
        cmd = [*self.prefix, "redis-cli", "-h", self.bind, "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        proc = subprocess.run([*cmd, "ping"], capture_output=True, text=True)
        return "PONG" in proc.stdout

    def cli(self, *args: str) -> str:
        cmd = [*self.prefix, "redis-cli", "-h", self.bind, "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, check=True).stdout

    def kill(self) -> None:
        """SIGKILL: the store dies with everything it held."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
