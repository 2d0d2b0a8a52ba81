"""The Ray actor that hosts one rank (``MoeserveRank``), how it is placed and started, and ``prestart``: one
replica's actors started before the engine asks for them.

``moeserve serve`` calls ``prestart`` once its arguments are checked: each actor imports the rank code while
the server loads its own, and gets its spec when the executor takes it over (``take_prestarted``). A Ray
actor costs about 0.3 CPU-seconds of Ray's own before its class even loads (BENCHMARKS.md, issue 23); started
ahead, that and the imports overlap the server's start instead of following it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import uuid
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeserve.comm.topology import ParallelDims
from moeserve.coordinator.executor import ReplicaLayout
from moeserve.coordinator.ray_cluster import bundle, connect_for_later, custom_resources

logger = logging.getLogger(__name__)

NAMESPACE = "moeserve"  # the actors' Ray namespace; each is named moeserve-<replica id>-rank-<rank>
FORWARDED_ENV = ("GLOO_", "NCCL_", "HCCL_", "MOESERVE_")  # the network and store settings the ranks inherit
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"  # "True": a tcp:// rendezvous's store is hosted elsewhere


class MoeserveRank:
    """A Ray actor that hosts one rank: its main loop starts with the actor, on a thread of its own, and
    ``run`` waits for it; ``where`` answers meanwhile (two calls at once: ``max_concurrency=2``). An actor
    started ahead (``spec_json`` None) imports the rank code and waits for ``start`` to give it its spec."""

    def __init__(self, spec_json: str | None, env: dict[str, str]):
        # NOTE: the rank starts here rather than in a task sent once the actor is up: that task would wait for
        # Ray to tell the driver the actor is alive and for the driver to send it (0.1-0.3 s here, more under
        # load). ``env`` is set before the rank imports anything that reads it
        os.environ.update(env)
        self.exit_code = 1  # until the main loop returns: an exception that escapes it is a failure
        self.spec_json = spec_json
        self.given = threading.Event()
        if spec_json is not None:
            self.given.set()
        self.rank = threading.Thread(target=self._run_rank, name="moeserve-rank", daemon=True)
        self.rank.start()

    def start(self, spec_json: str, env: dict[str, str]) -> None:
        """An actor started ahead: its rank's spec, and the environment the executor gives its ranks."""
        os.environ.update(env)
        self.spec_json = spec_json
        self.given.set()

    def _run_rank(self) -> None:
        import moeserve.stages.worker  # noqa: F401  (the rank's imports, before its spec is known)

        self.given.wait()
        assert self.spec_json is not None
        self._main(self.spec_json)

    def _main(self, spec_json: str) -> None:
        from moeserve.stages.worker import main

        self.exit_code = main([spec_json])

    def where(self) -> tuple[str, str, str]:
        """(node IP, Ray node id, host name) of this actor."""
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), socket.gethostname()

    def run(self) -> int:
        """Wait for the rank's main loop (stages/worker.py); its exit code once the coordinator stops it."""
        self.rank.join()
        return self.exit_code


def rank_env() -> dict[str, str]:
    """The environment every rank gets: this process's network and store settings (``FORWARDED_ENV``), and
    torch's switch that makes every rank a client of the driver's rendezvous store."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    env[AGENT_STORE_ENV] = "True"
    return env


def reserve(replica_id: str, dims: ParallelDims, device: str) -> list[PlacementGroup]:
    """One placement group per pipeline stage, its tp bundles on one node; kept across restarts (waited for
    by ``RayExecutor._start_actors``)."""
    one = bundle(device)
    return [placement_group([one] * dims.tp, strategy="STRICT_PACK", name=f"moeserve-{replica_id}-stage-{stage}")
            for stage in range(dims.pp)]


def new_actor(replica_id: str, groups: list[PlacementGroup], dims: ParallelDims, device: str, rank: int,
              generation: int, spec_json: str | None, env: dict[str, str]) -> Any:
    """Rank ``rank``'s actor in its stage's group and bundle (``spec_json`` None: started ahead)."""
    one, coord = bundle(device), dims.coord(rank)
    suffix = f".g{generation}" if generation else ""
    return ray.remote(MoeserveRank).options(
        name=f"moeserve-{replica_id}-rank-{rank}{suffix}", namespace=NAMESPACE, max_restarts=0, max_concurrency=2,
        num_cpus=one["CPU"], num_gpus=one.get("GPU", 0), resources=custom_resources(one),
        scheduling_strategy=PlacementGroupSchedulingStrategy(groups[coord.pp_stage], coord.tp_rank),
    ).remote(spec_json, env)


def release(actors: list[Any], groups: list[PlacementGroup]) -> None:
    """Kill these actors and remove these placement groups (freeing their bundles)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    for group in groups:
        remove_placement_group(group)


class Prestarted:
    """One replica's placement groups and actors, started on a thread before the engine asks for them."""

    def __init__(self, dims: ParallelDims, device: str):
        self.dims, self.device = dims, device
        self.replica_id = uuid.uuid4().hex[:8]
        self.groups: list[PlacementGroup] = []
        self.actors: list[Any] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            connect_for_later()
            self.groups = reserve(self.replica_id, self.dims, self.device)
            env = rank_env()
            self.actors = [new_actor(self.replica_id, self.groups, self.dims, self.device, rank, 0, None, env)
                           for rank in range(self.dims.pp * self.dims.tp)]
        except BaseException as e:  # noqa: BLE001  (the executor starts its actors itself, and says why not these)
            self.error = e
        finally:
            self.done.set()

    def discard(self) -> None:
        release(self.actors, self.groups)
        self.actors, self.groups = [], []


_prestarted: Prestarted | None = None
_prestarted_lock = threading.Lock()


def prestart(dims: ParallelDims, device: str) -> None:
    """Start one replica's actors now, on a thread (connecting to Ray first), for the executor of this layout
    to take over; actors nobody takes are killed when this process exits."""
    global _prestarted
    early = Prestarted(dims, device)
    with _prestarted_lock:
        _prestarted = early
    logger.info("Ray: starting the %d ranks' actors ahead", dims.pp * dims.tp)
    threading.Thread(target=early.run, name="moeserve-ray-prestart", daemon=True).start()
    atexit.register(_discard_unclaimed)


def take_prestarted(layout: ReplicaLayout) -> Prestarted | None:
    """The actors ``prestart`` started, once started, if they fit ``layout`` (else they are killed): None when
    there are none."""
    global _prestarted
    with _prestarted_lock:
        early, _prestarted = _prestarted, None
    if early is None:
        return None
    early.done.wait()
    if early.error is None and early.dims == layout.dims and early.device == layout.device:
        return early
    if early.error is not None:
        logger.warning("Ray: the actors started ahead failed (%s: %s); starting them now", type(early.error).__name__,
                       early.error)
    early.discard()
    return None


def _discard_unclaimed() -> None:
    global _prestarted
    with _prestarted_lock:
        early, _prestarted = _prestarted, None
    if early is not None and early.done.wait(10) and ray.is_initialized():
        early.discard()
