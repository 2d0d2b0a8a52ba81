"""The ranks of a node r > 0 of ``moeserve launch cluster``, supervised by its launcher (cluster.py), over the
control plane's TCPStore keys:

* ``hb/{node}``: a counter this node adds to every ``HEARTBEAT_S``; node 0 calls a node lost whose counter
  stands still.
* ``failed/{generation}``: the first rank seen dead in that generation of the ranks ({reason, code, rank,
  node}); the node stops its other ranks and waits for node 0's decision.
* ``restart/{generation}``: node 0 restarts every rank (executor.py's ``restart``): each node kills the ranks
  it has, says so (``stopped/{generation}/{node}``), then starts its ranks of ``specs/{generation}``.
* ``shutdown``: stop the ranks, say ``bye/{node}`` and exit.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from moeserve.coordinator.worker_processes import kill_processes, spawn_workers, stop_processes
from moeserve.stages.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5


def specs_key(generation: int) -> str:
    """The store key of the ranks' specs of a generation (node 0 publishes them)."""
    return "specs" if generation == 0 else f"specs/{generation}"


class NodeRanks:
    """This node's ranks of the current generation, and what the node does with the store's keys.
    ``plane``: the ControlPlane; ``mine``: this node's share of a generation's specs."""

    def __init__(self, plane: Any, specs: list[WorkerSpec], mine: Callable[[list[WorkerSpec]], list[WorkerSpec]],
                 env: dict[str, str]):
        self.plane, self.node, self.mine, self.env = plane, plane.cc.node_rank, mine, env
        self.specs = mine(specs)
        self.generation = self.specs[0].generation if self.specs else 0
        self.procs: list[subprocess.Popen] = spawn_workers(self.specs, env)
        self.failed_here = False  # a rank of ours died, and no restart followed (yet)

    def supervise(self) -> int:
        """Heartbeat; restart the ranks when node 0 says so; stop everything when node 0 says so or is gone.
        Returns the node's exit code: 1 when node 0 stopped after a failure of this node's rank, or is gone."""
        while True:
            try:
                self.plane.store.add(f"hb/{self.node}", 1)
                if self.plane.has("shutdown"):
                    stop_processes(self.procs)
                    self.plane.store.set(f"bye/{self.node}", "1")
                    return 1 if self.failed_here else 0
                if self.plane.has(f"restart/{self.generation + 1}"):
                    self._restart()
                    continue
            except (RuntimeError, OSError) as e:  # DistStoreError is a RuntimeError
                logger.error("node %d lost node 0 (%s); stopping its ranks", self.node, e)
                stop_processes(self.procs, grace_s=0)
                return 1
            if self._exited_cleanly():
                stop_processes(self.procs)
                self.plane.store.set(f"bye/{self.node}", "1")
                return 0
            self._check_ranks()
            time.sleep(HEARTBEAT_S)

    def _exited_cleanly(self) -> bool:
        """A rank exited 0: the coordinator told it to stop (its shutdown may reach the store a moment later)."""
        return any(proc.poll() == 0 for proc in self.procs)

    def _check_ranks(self) -> None:
        """A rank that died: report it (once per generation) and stop the others, until node 0 decides."""
        for spec, proc in zip(self.specs, self.procs):
            code = proc.poll()
            if code is None or self.plane.has("shutdown"):
                continue
            reason = f"rank {spec.rank} (node {self.node}, {socket.gethostname()}) exited with code {code}"
            key = f"failed/{self.generation}"
            if not self.plane.has(key):
                self.plane.set_json(key, {"reason": reason, "code": code, "rank": spec.rank, "node": self.node})
            logger.error("%s; stopping the other ranks of this node until node 0 restarts them", reason)
            kill_processes(self.procs)
            self.procs, self.specs, self.failed_here = [], [], True
            return

    def _restart(self) -> None:
        """Node 0 restarts the replica: kill what is left of ours, say so, start ours of the next generation."""
        kill_processes(self.procs)
        self.generation += 1
        self.plane.store.set(f"stopped/{self.generation}/{self.node}", "1")
        deadline = time.monotonic() + 60
        while not self.plane.has(specs_key(self.generation)):
            if self.plane.has("shutdown") or time.monotonic() > deadline:
                self.procs, self.specs = [], []
                return
            self.plane.store.add(f"hb/{self.node}", 1)
            time.sleep(0.1)
        specs = [WorkerSpec.from_json(s) for s in self.plane.get_json(specs_key(self.generation))]
        self.specs = self.mine(specs)
        logger.warning("node %d: restarting its ranks %s (generation %d)", self.node,
                       [s.rank for s in self.specs], self.generation)
        self.procs = spawn_workers(self.specs, self.env)
        self.failed_here = False
