"""Hosts for multi-node tests: network namespaces, each with its own ``eth0`` and IP address, joined by veth
pairs to a bridge that lives in a namespace of its own (the machine's own network is never touched).

Needs root (CAP_NET_ADMIN / CAP_SYS_ADMIN) and iproute2; ``NetnsHosts.unavailable()`` says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.77.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsHosts:
    def __init__(self, n: int):
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"msb{tag}"
        self.names = [f"msh{tag}n{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]

    @staticmethod
    def unavailable() -> str | None:
        """None when namespaces can be made here, else the reason they cannot."""
        if shutil.which("ip") is None:
            return "iproute2's ip command is not installed"
        probe = f"msprobe{os.getpid()}"
        proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if proc.returncode != 0:
            return f"cannot create a network namespace: {proc.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def __enter__(self) -> NetnsHosts:
        try:
            _ip("netns", "add", self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, (name, addr) in enumerate(zip(self.names, self.addrs)):
                _ip("netns", "add", name)
                # one end straight into the host namespace, the other into the bridge's
                _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p{i}", "netns",
                    self.bridge)
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.bridge, "link", "set", f"p{i}", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def popen(self, i: int, cmd: list[str], log: Path) -> subprocess.Popen:
        """Run ``cmd`` on host ``i``; stdout and stderr go to ``log``.out / ``log``.err."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *cmd],
                                stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"))

    def pids(self, i: int) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split()]

    def worker_pids(self, i: int) -> list[int]:
        """The stage-worker processes running on host ``i``."""
        found = []
        for pid in self.pids(i):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"moeserve.stages.worker" in cmdline:
                found.append(pid)
        return found

    def http(self, i: int, port: int, path: str, body: dict | None = None, timeout: float = 60,
             addr: str = "127.0.0.1") -> tuple[int, str]:
        """An HTTP request to ``addr:port`` (default: host ``i``'s loopback) made from inside host ``i`` (the
        test's own namespace cannot reach the bridge): (status, body text); status 0 when nothing answered."""
        script = ("import json, sys, urllib.request, urllib.error\n"
                  "url, body = sys.argv[1], sys.argv[2]\n"
                  "req = urllib.request.Request(url, data=body.encode() or None,\n"
                  "                             headers={'Content-Type': 'application/json'})\n"
                  "try:\n"
                  "    r = urllib.request.urlopen(req, timeout=50); print(r.status); print(r.read().decode())\n"
                  "except urllib.error.HTTPError as e:\n"
                  "    print(e.code); print(e.read().decode())\n"
                  "except OSError as e:\n"
                  "    print(0); print(e)\n")
        proc = subprocess.run(["ip", "netns", "exec", self.names[i], sys.executable, "-c", script,
                               f"http://{addr}:{port}{path}", json.dumps(body) if body is not None else ""],
                              capture_output=True, text=True, timeout=timeout)
        status, _, text = proc.stdout.partition("\n")
        return int(status or 0), text

    def wait_healthy(self, i: int, port: int, timeout_s: float, addr: str = "127.0.0.1") -> None:
        """Wait until host ``i``'s server on ``port`` (at ``addr``) answers /health with 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.http(i, port, "/health", addr=addr)[0] == 200:
                return
            time.sleep(0.5)
        raise AssertionError(f"host {i}'s server on port {port} never became healthy")

    def wait_empty(self, timeout_s: float) -> bool:
        """True once no process is left in any host namespace."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(self.pids(i) for i in range(len(self.names))):
                return True
            time.sleep(0.2)
        return False

    def __exit__(self, *exc: object) -> None:
        for i in range(len(self.names)):
            for pid in self.pids(i):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in [*self.names, self.bridge]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
