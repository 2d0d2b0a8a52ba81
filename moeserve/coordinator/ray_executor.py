"""RayExecutor: the ranks of a replica as Ray actors (``--distributed-executor-backend ray``, as vLLM's flag),
on the Ray cluster of ``RAY_ADDRESS``, or on a local Ray started for this process when none is given.

Only the start and the watch differ from the other rank executors: each actor hosts the ordinary rank main
loop (``moeserve.stages.worker.main``, started by its constructor), so the ZeroMQ step channel and the
torch.distributed groups form as they do with processes; the rendezvous store is the driver's. Placement: one
placement group per pipeline stage, one bundle per rank (a CPU, or a GPU / NPU), ``STRICT_PACK`` so that the tp
ranks of a stage share a node, while stages may land on other nodes. A rank whose actor (or node) dies ends
its main-loop task with an error, which ``_failures`` reports naming the rank and its node; ``shutdown`` stops
the loops, kills every actor and removes the groups.

``ray_actor.prestart`` starts one replica's actors before the engine asks for them (``moeserve serve``).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import ray
import torch.distributed as dist
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import PlacementGroup

from moeserve.coordinator.executor import ReplicaLayout, WorkerError
from moeserve.coordinator.rank_executor import RankExecutor
from moeserve.coordinator.ray_actor import new_actor, rank_env, release, reserve, take_prestarted
from moeserve.coordinator.ray_cluster import RankPlace, bundle, bundle_places, connect, free_local_port
from moeserve.stages.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0  # for the cluster to offer every bundle; past it the start fails, saying why


class RayExecutor(RankExecutor):
    failure_grace_s = 2.0  # another node's actor death reaches the driver a moment after its peers' errors
    ranks_in_view = False

    def __init__(self, layout: ReplicaLayout, startup_timeout_s: float = 600.0):
        early = take_prestarted(layout)
        self.owns_connection = connect()
        self.layout = layout
        self.replica_id = early.replica_id if early else uuid.uuid4().hex[:8]
        self.groups: list[PlacementGroup] = early.groups if early else []
        self.actors: list[Any] = []
        self.places: list[RankPlace] = []
        self.loops: list[Any] = []  # each rank's ``run`` task
        self.rendezvous_store: dist.TCPStore | None = None  # the ranks' rendezvous (of their generation)
        self.coord_addr = f"tcp://{ray.util.get_node_ip_address()}:{free_local_port()}"
        try:
            if early is None:
                self.groups = reserve(self.replica_id, layout.dims, layout.device)
            specs = self._start_actors(generation=0, started=early.actors if early else None)
        except BaseException:
            self._stop_ranks()
            raise
        super().__init__(specs, self.coord_addr, startup_timeout_s=startup_timeout_s)

    @classmethod
    def launch(cls, layout: ReplicaLayout) -> RayExecutor:
        return cls(layout)

    def _await_groups(self) -> None:
        dims, one = self.layout.dims, bundle(self.layout.device)
        for stage, group in enumerate(self.groups):
            if not group.wait(PLACEMENT_TIMEOUT_S):
                raise WorkerError(f"the Ray cluster did not offer {dims.tp} x {one} on one node for pipeline "
                                  f"stage {stage} within {PLACEMENT_TIMEOUT_S:.0f} s (cluster resources: "
                                  f"{ray.cluster_resources()})")

    def _start_actors(self, generation: int, started: list[Any] | None = None) -> list[WorkerSpec]:
        """One actor per rank in its stage's group, each starting its rank at once (or, ``started``, the
        actors started ahead by ``prestart``, each given its spec); the ranks' specs of ``generation``. Nothing
        here waits for an actor: where each rank runs is read from the placement groups, so every spec is
        known before any actor starts, and each rank begins as soon as its actor is up, not once the slowest
        one is."""
        self._await_groups()
        self.places = bundle_places(self.groups, self.layout.dims.tp)
        specs = self._specs(generation)
        if started is not None:
            for actor, spec in zip(started, specs):
                actor.start.remote(spec.to_json(), self._env)
            self.actors = list(started)
            return specs
        for spec in specs:
            self.actors.append(new_actor(self.replica_id, self.groups, self.layout.dims, self.layout.device,
                                         spec.rank, generation, spec.to_json(), self._env))
        return specs

    def _specs(self, generation: int) -> list[WorkerSpec]:
        """The ranks' specs (and environment), with a rendezvous store of this generation's own."""
        one, driver_ip = bundle(self.layout.device), ray.util.get_node_ip_address()
        # NOTE: the rendezvous store is the driver's, listening before any rank starts, as torchrun's agent
        # hosts it. With a tcp:// rendezvous rank 0 hosts it, and the ranks that try it before it listens back
        # off: 0.3-0.8 s lost on most starts here (BENCHMARKS.md, issue 23)
        self.rendezvous_store = dist.TCPStore(driver_ip, 0, len(self.places), is_master=True, wait_for_workers=False)
        rendezvous = f"tcp://{driver_ip}:{self.rendezvous_store.port}"
        node_index = {n: i for i, n in enumerate(dict.fromkeys(p.node_id for p in self.places))}
        specs = [self.layout.spec(rank, 0, rendezvous, self.coord_addr, node=node_index[p.node_id],
                                  num_threads=int(one["CPU"]), generation=generation)
                 for rank, p in enumerate(self.places)]  # Ray gives each actor its own device, as index 0
        self._env = rank_env()
        if all(p.ip == driver_ip for p in self.places):
            self._env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine, as the mp executor
        logger.info("Ray placed %d ranks on %d node(s)", len(specs), len(node_index))
        return specs

    def _kill_ranks(self) -> None:
        """Kill every rank's actor (its bundle stays reserved for the next one)."""
        release(self.actors, [])
        if self.loops:
            ray.wait(self.loops, num_returns=len(self.loops), timeout=10)
        self.actors, self.loops, self.places = [], [], []

    def _next_specs(self) -> list[WorkerSpec]:
        return self._start_actors(self.specs[0].generation + 1)

    def _start_ranks(self) -> None:
        self.loops = [a.run.remote() for a in self.actors]  # the ranks started with their actors

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
            except RayActorError as e:  # the actor, or its node, died; or it never started
                cause = str(e).strip().splitlines()[-1 if e.actor_init_failed else 0] if str(e).strip() \
                    else type(e).__name__
                if e.actor_init_failed:  # e.g. moeserve (this version) is not importable on that node
                    found.append(WorkerError(f"{self._where(rank)}: its Ray actor could not start ({cause})", 1,
                                             **where))
                else:
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
            release(self.actors, self.groups)
        except (RayError, ConnectionError) as e:  # the cluster itself is gone: its actors went with it
            logger.warning("Ray: could not stop every rank's actor (%s)", e)
        self.actors, self.groups, self.loops, self.rendezvous_store = [], [], [], None
        if self.owns_connection:
            ray.shutdown()
            self.owns_connection = False
