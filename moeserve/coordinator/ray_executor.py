"""RayExecutor: the ranks of a replica as Ray actors (``--distributed-executor-backend ray``, as vLLM's flag),
on the Ray cluster of ``RAY_ADDRESS``, or on a local Ray started for this process when none is given.

Only the start and the watch differ from the other rank executors: each actor hosts the ordinary rank main
loop (``moeserve.stages.worker.main``), so the ZeroMQ step channel and the torch.distributed groups form as
they do with processes. Placement: one placement group per pipeline stage, one bundle per rank (a CPU, or a
GPU / NPU), ``STRICT_PACK`` so that the tp ranks of a stage share a node, while stages may land on other
nodes. A rank whose actor (or node) dies ends its main-loop task with an error, which ``_failures`` reports
naming the rank and its node; ``shutdown`` stops the loops, kills every actor and removes the groups.

Ray is the optional extra ``moeserve[ray]``; this module is imported only when the backend is asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeserve.coordinator.executor import ReplicaLayout, WorkerError
from moeserve.coordinator.rank_executor import RankExecutor
from moeserve.stages.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

NAMESPACE = "moeserve"  # the actors' Ray namespace; each is named moeserve-<replica id>-rank-<rank>
FORWARDED_ENV = ("GLOO_", "NCCL_", "HCCL_", "MOESERVE_")  # the network and store settings the ranks inherit
PLACEMENT_TIMEOUT_S = 60.0  # for the cluster to offer every bundle; past it the start fails, saying why


class MoeserveRank:
    """A Ray actor that hosts one rank: where it runs, then the rank's main loop until it is told to stop."""

    def where(self) -> tuple[str, str, str]:
        """(node IP, Ray node id, host name) of this actor."""
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), socket.gethostname()

    def free_port(self) -> int:
        """A TCP port free on this actor's node now (rank 0's: the torch.distributed rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, spec_json: str, env: dict[str, str]) -> int:
        """The rank's main loop (stages/worker.py); returns its exit code once the coordinator stops it."""
        from moeserve.stages.worker import main

        os.environ.update(env)
        return main([spec_json])


@dataclass(frozen=True)
class RankPlace:
    ip: str
    node_id: str
    host: str


def connect() -> bool:
    """Join the Ray cluster of RAY_ADDRESS, or start a local one; True when this call connected (and the
    executor disconnects again at shutdown)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    # NOTE: "local" starts a Ray of this process's own: without it, ray.init() joins any Ray that runs on this
    # machine, which is not what an unset RAY_ADDRESS asks for
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True)
    logger.info("Ray: %s", "connected to " + address if address else "started a local instance")
    return True


RAY_ACCELERATORS = {"cuda": "GPU", "npu": "NPU"}  # device type -> the Ray resource of one of its devices


def bundle(device: str) -> dict[str, float]:
    """One rank's share of a node: a CPU, and one device of the rank's type."""
    accelerator = RAY_ACCELERATORS.get(device.split(":")[0])
    return {"CPU": 1.0} | ({accelerator: 1.0} if accelerator else {})


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RayExecutor(RankExecutor):
    failure_grace_s = 2.0  # another node's actor death reaches the driver a moment after its peers' errors
    ranks_in_view = False

    def __init__(self, layout: ReplicaLayout, startup_timeout_s: float = 600.0):
        self.owns_connection = connect()
        self.layout = layout
        self.replica_id = uuid.uuid4().hex[:8]
        self.groups: list[PlacementGroup] = []
        self.actors: list[Any] = []
        self.places: list[RankPlace] = []
        self.loops: list[Any] = []  # each rank's ``run`` task
        self.coord_addr = f"tcp://{ray.util.get_node_ip_address()}:{free_local_port()}"
        try:
            self._reserve()
            specs = self._start_actors(generation=0)
        except BaseException:
            self._stop_ranks()
            raise
        super().__init__(specs, self.coord_addr, startup_timeout_s=startup_timeout_s)

    @classmethod
    def launch(cls, layout: ReplicaLayout) -> RayExecutor:
        return cls(layout)

    def _reserve(self) -> None:
        """One placement group per pipeline stage, its tp bundles on one node; kept across restarts."""
        dims, one = self.layout.dims, bundle(self.layout.device)
        for stage in range(dims.pp):
            group = placement_group([one] * dims.tp, strategy="STRICT_PACK",
                                    name=f"moeserve-{self.replica_id}-stage-{stage}")
            self.groups.append(group)
            if not group.wait(PLACEMENT_TIMEOUT_S):
                raise WorkerError(f"the Ray cluster did not offer {dims.tp} x {one} on one node for pipeline "
                                  f"stage {stage} within {PLACEMENT_TIMEOUT_S:.0f} s (cluster resources: "
                                  f"{ray.cluster_resources()})")

    def _start_actors(self, generation: int) -> list[WorkerSpec]:
        """One actor per rank in its stage's group; the ranks' specs of ``generation`` (rendezvous on rank 0's
        node, at a port free there now)."""
        layout, dims, one = self.layout, self.layout.dims, bundle(self.layout.device)
        actor = ray.remote(MoeserveRank)
        suffix = f".g{generation}" if generation else ""
        for rank in range(dims.world_size):
            coord = dims.coord(rank)
            strategy = PlacementGroupSchedulingStrategy(self.groups[coord.pp_stage], coord.tp_rank)
            self.actors.append(actor.options(
                name=f"moeserve-{self.replica_id}-rank-{rank}{suffix}", namespace=NAMESPACE, max_restarts=0,
                num_cpus=one["CPU"], num_gpus=one.get("GPU", 0), resources=_custom(one),
                scheduling_strategy=strategy).remote())
        try:
            self.places = [RankPlace(*w) for w in ray.get([a.where.remote() for a in self.actors])]
        except RayError as e:  # e.g. moeserve (this version) is not importable on that node
            raise WorkerError(f"a rank's Ray actor could not start: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        driver_ip = ray.util.get_node_ip_address()
        node_index = {n: i for i, n in enumerate(dict.fromkeys(p.node_id for p in self.places))}
        rendezvous = f"tcp://{self.places[0].ip}:{ray.get(self.actors[0].free_port.remote())}"
        specs = [layout.spec(rank, 0, rendezvous, self.coord_addr, node=node_index[p.node_id],
                             num_threads=int(one["CPU"]), generation=generation)
                 for rank, p in enumerate(self.places)]  # Ray gives each actor its own device, as index 0
        self._env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        if all(p.ip == driver_ip for p in self.places):
            self._env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine, as the mp executor
        logger.info("Ray placed %d ranks on %d node(s)", len(specs), len(node_index))
        return specs

    def _kill_ranks(self) -> None:
        """Kill every rank's actor (its bundle stays reserved for the next one)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.loops:
            ray.wait(self.loops, num_returns=len(self.loops), timeout=10)
        self.actors, self.loops, self.places = [], [], []

    def _next_specs(self) -> list[WorkerSpec]:
        return self._start_actors(self.specs[0].generation + 1)

    def _start_ranks(self) -> None:
        self.loops = [a.run.remote(s.to_json(), self._env) for a, s in zip(self.actors, self.specs)]

    def _where(self, rank: int) -> str:
        p = self.places[rank]
        return f"rank {rank} (node {self.specs[rank].node}: {p.host} {p.ip}, Ray node {p.node_id[:12]})"

    def _failures(self, reported: int | None = None) -> list[WorkerError]:
        if not self.loops:
            return []
        done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        finished = set(done)
        found = []
        for rank, ref in enumerate(self.loops):
            if ref not in finished or rank == reported:
                continue
            where = dict(rank=rank, node=self.specs[rank].node)
            try:
                code = ray.get(ref)
            except RayActorError as e:  # the actor, or its node, died
                cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                found.append(WorkerError(f"{self._where(rank)}: its Ray actor died ({cause})", -9, **where))
                continue
            except RayError as e:
                found.append(WorkerError(f"{self._where(rank)} failed in Ray: {type(e).__name__}: {e}", 1, **where))
                continue
            found.append(WorkerError(f"{self._where(rank)} exited with code {code}", code, **where))
        return found

    def _stop_ranks(self, grace_s: float = 10.0) -> None:
        """The loops were told to stop: wait for them, then kill every actor and free the bundles."""
        try:
            if self.loops:
                ray.wait(self.loops, num_returns=len(self.loops), timeout=grace_s)
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            for group in self.groups:
                remove_placement_group(group)
        except (RayError, ConnectionError) as e:  # the cluster itself is gone: its actors went with it
            logger.warning("Ray: could not stop every rank's actor (%s)", e)
        self.actors, self.groups, self.loops = [], [], []
        if self.owns_connection:
            ray.shutdown()
            self.owns_connection = False


def _custom(one: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in one.items() if k not in ("CPU", "GPU")}
