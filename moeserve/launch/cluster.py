"""``moeserve launch cluster``: one model over several nodes, with the same command on every node.

Three channels, all opened from node 0's address (``--master-addr``):

* ``master_port``: a torch.distributed ``TCPStore`` hosted by node 0's launcher, the control plane. Nodes
  join through it, exchange their preflight facts, receive the rank specs, send heartbeats, report a dead
  rank (``failed``) and learn of the shutdown (``shutdown``).
* ``master_port + 1``: the coordinator's ZeroMQ ROUTER (step plans and logits, msgpack; executor.py).
* ``master_port + 2``: the ranks' own torch.distributed rendezvous (``tcp://``, hosted by rank 0).

A node's life: (1) export and print the network settings, (2) join the store within ``--join-timeout``,
(3) preflight: node 0 checks that every node joined and runs the same moeserve and torch and sees the same
checkpoint, (4) node 0 plans the layout and publishes every rank's spec; each node starts its own ranks
(which time an all-reduce and an all-to-all before loading weights), (5) node 0 serves while the other nodes
supervise their ranks, (6) shutdown: node 0 sets ``shutdown`` and every node stops its ranks and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

import moeserve
from moeserve.coordinator.executor import ReplicaLayout, RestartUnsupported, WorkerError
from moeserve.coordinator.mp_executor import MultiprocExecutor
from moeserve.coordinator.worker_processes import spawn_workers, stop_processes
from moeserve.launch.cluster_config import (
    ClusterConfig,
    ClusterError,
    print_network,
)
from moeserve.stages.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
HEARTBEAT_TIMEOUT_S = 15.0  # a node whose heartbeat counter stands still this long is lost


def checkpoint_fingerprint(model: str) -> str:
    """Same on every node that sees the same checkpoint: config.json and the tensor index (config.json
    alone for --load-format dummy, which reads no weights)."""
    import hashlib

    from moeserve.model.loader import Checkpoint, CheckpointError

    try:
        return Checkpoint(model).fingerprint()
    except CheckpointError:
        config = Path(model) / "config.json"
        if not config.is_file():
            raise
        return hashlib.sha256(config.read_bytes()).hexdigest()[:16]


def node_facts(model: str) -> dict[str, str]:
    import torch

    return {"host": socket.gethostname(), "moeserve": moeserve.__version__, "torch": torch.__version__,
            "checkpoint": checkpoint_fingerprint(model)}


class ControlPlane:
    """The launcher's view of the TCPStore every node shares."""

    def __init__(self, cc: ClusterConfig):
        self.cc = cc
        try:
            self.store = dist.TCPStore(cc.master_addr, cc.master_port, cc.nnodes, is_master=cc.node_rank == 0,
                                       timeout=timedelta(seconds=cc.join_timeout_s), wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            where = "listen on" if cc.node_rank == 0 else "reach node 0 at"
            raise ClusterError(f"node {cc.node_rank} could not {where} {cc.master_addr}:{cc.master_port} "
                               f"within {cc.join_timeout_s:.0f} s: {e}") from e
        self.store.set_timeout(timedelta(seconds=cc.join_timeout_s))

    def has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def get_json(self, key: str) -> Any:
        return json.loads(self.store.get(key))

    def set_json(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def wait_for(self, key: str, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.has(key):
            if self.has("shutdown"):
                raise ClusterError(f"node 0 shut the cluster down: {self.store.get('shutdown').decode()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"node {self.cc.node_rank}: no {what} from node 0 within {timeout_s:.0f} s")
            time.sleep(0.2)
        return self.get_json(key)

    # ---- preflight (node 0) ----
    def gather_nodes(self) -> dict[int, dict[str, str]]:
        """Wait for every node's facts; a node that never joins is named."""
        keys = [f"node/{r}" for r in range(self.cc.nnodes)]
        deadline = time.monotonic() + self.cc.join_timeout_s
        while not all(self.has(k) for k in keys):
            if time.monotonic() > deadline:
                missing = [r for r, k in enumerate(keys) if not self.has(k)]
                raise ClusterError(f"node(s) {', '.join(map(str, missing))} did not join within "
                                   f"{self.cc.join_timeout_s:.0f} s (master {self.cc.master_addr}:"
                                   f"{self.cc.master_port}); check that they were started and can reach it")
            time.sleep(0.2)
        return {r: self.get_json(k) for r, k in enumerate(keys)}

    def fail(self, reason: str) -> None:
        """Tell every node to stop (they read it in their supervision loop or while waiting)."""
        self.store.set("shutdown", reason)

    def wait_for_goodbyes(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        for r in range(1, self.cc.nnodes):
            while not self.has(f"bye/{r}") and time.monotonic() < deadline:
                time.sleep(0.1)


def check_nodes(facts: dict[int, dict[str, str]]) -> None:
    """Every node must run the same moeserve and torch versions and see the same checkpoint."""
    ref = facts[0]
    for r, f in sorted(facts.items()):
        for key, what in (("moeserve", "moeserve version"), ("torch", "torch version"),
                          ("checkpoint", "checkpoint fingerprint (config.json + tensor index)")):
            if f.get(key) != ref.get(key):
                raise ClusterError(f"node {r} ({f.get('host')}) has {what} {f.get(key)!r}, node 0 has "
                                   f"{ref.get(key)!r}")


class ClusterExecutor(MultiprocExecutor):
    """Node 0's executor: starts node 0's ranks, and sees the other nodes' ranks die through the store (their
    launchers' ``failed`` reports and heartbeats)."""

    failure_grace_s = 2.0  # a rank's death on another node shows a moment after its peers' errors
    ranks_in_view = False

    def __init__(self, plane: ControlPlane, specs: list[WorkerSpec], coord_bind: str, per_node: int,
                 env: dict[str, str]):
        self.plane = plane
        self._beats: dict[int, tuple[int, float]] = {}
        super().__init__(specs, coord_bind, local_specs=specs[:per_node], env=env)

    def _kill_ranks(self) -> None:
        raise RestartUnsupported("launch cluster does not restart its ranks yet: the cluster stops")

    def _failures(self, reported: int | None = None) -> list[WorkerError]:
        found = super()._failures(reported)
        try:
            self._check_nodes()
        except WorkerError as e:
            found.append(e)
        return found

    def _check_nodes(self) -> None:
        """Raise WorkerError for a rank another node saw die, or a node whose heartbeat stopped."""
        if self.plane.has("failed"):
            failed = self.plane.get_json("failed")
            raise WorkerError(failed["reason"], failed["code"])
        now = time.monotonic()
        for r in range(1, self.plane.cc.nnodes):
            count = self.plane.store.add(f"hb/{r}", 0)
            last = self._beats.get(r)
            if last is None or last[0] != count:
                self._beats[r] = (count, now)
            elif now - last[1] > HEARTBEAT_TIMEOUT_S:
                raise WorkerError(f"node {r} stopped answering (no heartbeat for {now - last[1]:.0f} s)")


class ClusterLauncher:
    """The engine's launcher on node 0: publishes every rank's spec and starts the ClusterExecutor."""

    def __init__(self, plane: ControlPlane, env: dict[str, str]):
        self.plane, self.cc, self.env = plane, plane.cc, env

    def __call__(self, layout: ReplicaLayout) -> ClusterExecutor:
        cc = self.cc
        per_node = cc.ranks_per_node(layout.dims.world_size)
        threads = max(1, (os.cpu_count() or 1) // per_node)
        specs = [layout.spec(r, r % per_node, f"tcp://{cc.master_addr}:{cc.dist_port}",
                             f"tcp://{cc.master_addr}:{cc.coordinator_port}", node=r // per_node, num_threads=threads)
                 for r in range(layout.dims.world_size)]
        self.plane.set_json("specs", [s.to_json() for s in specs])
        # NOTE: bound to node 0's cluster address only, not every interface: the ranks connect there
        bind = f"tcp://{socket.gethostbyname(cc.master_addr)}:{cc.coordinator_port}"
        return ClusterExecutor(self.plane, specs, bind, per_node, dict(os.environ) | self.env)


def supervise(plane: ControlPlane, procs: list[subprocess.Popen], specs: list[WorkerSpec]) -> int:
    """Node r > 0 after starting its ranks: heartbeat, and stop everything when node 0 says so, when node 0
    is gone, or when a local rank dies (which is reported to node 0 first)."""
    node = plane.cc.node_rank
    while True:
        try:
            plane.store.add(f"hb/{node}", 1)
            if plane.has("shutdown"):
                stop_processes(procs)
                plane.store.set(f"bye/{node}", "1")
                return 0
        except (RuntimeError, OSError) as e:  # DistStoreError is a RuntimeError
            logger.error("node %d lost node 0 (%s); stopping its ranks", node, e)
            stop_processes(procs, grace_s=0)
            return 1
        for spec, proc in zip(specs, procs):
            code = proc.poll()
            if code == 0:  # the coordinator told it to stop (its shutdown may reach the store a moment later)
                stop_processes(procs)
                plane.store.set(f"bye/{node}", "1")
                return 0
            if code is not None and not plane.has("shutdown"):
                reason = f"rank {spec.rank} (node {node}, {socket.gethostname()}) exited with code {code}"
                plane.set_json("failed", {"reason": reason, "code": code})
                logger.error("%s; stopping the other ranks of this node", reason)
                stop_processes(procs, grace_s=0)
                return 1
        time.sleep(HEARTBEAT_S)


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated(signal.Signals(signum).name)


def run_node(cc: ClusterConfig, engine_config, env: dict[str, str], work) -> int:
    """Run this node's part. ``work(engine)`` is node 0's job (serve, or generate and return)."""
    os.environ.update(env)                                                        # 1. network settings
    print_network(cc, env)
    signal.signal(signal.SIGTERM, _raise_terminated)
    plane = ControlPlane(cc)                                                      # 2. join
    plane.set_json(f"node/{cc.node_rank}", node_facts(str(engine_config.model_path)))
    if cc.node_rank == 0:
        return _run_coordinator(plane, engine_config, env, work)
    procs: list[subprocess.Popen] = []
    try:
        plane.wait_for("preflight", cc.join_timeout_s + 30, "preflight result")  # 3. preflight
        verdict = plane.get_json("preflight")
        if verdict != "ok":
            raise ClusterError(verdict)
        specs = [WorkerSpec.from_json(s) for s in plane.wait_for("specs", 600, "rank specs")]  # 4. ranks
        per_node = cc.ranks_per_node(len(specs))
        mine = specs[cc.node_rank * per_node:(cc.node_rank + 1) * per_node]
        procs = spawn_workers(mine, dict(os.environ))
        return supervise(plane, procs, mine)                                      # 5. supervise
    except (ClusterError, _Terminated, KeyboardInterrupt) as e:
        stop_processes(procs, grace_s=0)
        print(f"moeserve launch cluster: node {cc.node_rank}: {e}", file=sys.stderr)
        try:
            plane.store.set(f"bye/{cc.node_rank}", "1")  # node 0 need not wait for us
        except (RuntimeError, OSError):
            pass
        return 0 if isinstance(e, _Terminated) else 1


def _run_coordinator(plane: ControlPlane, engine_config, env: dict[str, str], work) -> int:
    from moeserve.coordinator.engine import Engine

    engine = None
    code = 1
    reason = "node 0 finished"
    try:
        try:
            check_nodes(plane.gather_nodes())                                     # 3. preflight
        except ClusterError as e:
            plane.set_json("preflight", str(e))
            raise
        plane.set_json("preflight", "ok")
        engine = Engine(engine_config, launcher=ClusterLauncher(plane, env))    # 4. ranks everywhere
        preflight = engine.executor.preflight
        if preflight is not None:
            print(f"[node 0] preflight: {preflight.world_size} ranks, {preflight.nbytes >> 10} KiB: all-reduce "
                  f"{preflight.all_reduce_s * 1e3:.2f} ms, all-to-all {preflight.all_to_all_s * 1e3:.2f} ms",
                  file=sys.stderr)
        code = work(engine)                                                       # 5. serve
    except (ClusterError, WorkerError) as e:
        reason = str(e)
        print(f"moeserve launch cluster: {e}", file=sys.stderr)
    except (_Terminated, KeyboardInterrupt) as e:
        reason, code = f"node 0 stopped ({e or 'interrupt'})", 0
        print(f"moeserve launch cluster: {reason}; shutting every node down", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the shutdown even if signalled again
        plane.fail(reason)                                                        # 6. shutdown
        if engine is not None:
            engine.close()
        plane.wait_for_goodbyes()
    return code
