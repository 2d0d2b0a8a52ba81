"""The rank processes of this node: started as ``python -m moeserve.stages.worker`` (one per rank, each in a
session of its own) and stopped in order, by the one-process executor and by each node's launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from moeserve.cpu_runtime import preload_env, shared_cores_env
from moeserve.stages.worker_spec import WorkerSpec


def spawn_workers(specs: list[WorkerSpec], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start one ``python -m moeserve.stages.worker`` process per spec (the ranks of this node).

    Each rank gets a session of its own, so that a signal to the launcher's process group (Ctrl-C in a
    terminal, a service manager, ``timeout``) reaches only the launcher, which stops the ranks in order; a rank
    whose launcher is gone stops by itself (see ``StageWorker.serve``)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if all(s.device.startswith("cpu") for s in specs):
        env.update(preload_env(env))  # CPU ranks on jemalloc and Intel OpenMP (moeserve/cpu_runtime.py)
        env.update(shared_cores_env(env, len(specs)))  # the node's ranks share its cores
    return [subprocess.Popen([sys.executable, "-m", "moeserve.stages.worker", s.to_json()], env=env,
                             start_new_session=True)
            for s in specs]


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Wait up to ``grace_s`` for processes to exit, then terminate, then kill what is left."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_processes(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process and reap it (a restart: a survivor may wait in a collective with a dead peer)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()
