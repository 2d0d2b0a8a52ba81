"""What the Ray executor asks of the Ray cluster, apart from its actors: the connection (``RAY_ADDRESS``, or a
local Ray started for this process), one rank's bundle, and where the placement groups put each rank."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table

logger = logging.getLogger(__name__)

_connected_here = False  # connect() called ray.init in this process, and no executor has taken that over yet


@dataclass(frozen=True)
class RankPlace:
    ip: str
    node_id: str
    host: str


def connect() -> bool:
    """Join the Ray cluster of RAY_ADDRESS, or start a local one; True when the caller owns the connection (and
    disconnects again at shutdown): this call connected, or an earlier one did that nobody has claimed yet (the
    prestart of ``ray_actor.prestart`` connects ahead of the executor)."""
    global _connected_here
    if ray.is_initialized():
        owned, _connected_here = _connected_here, False
        return owned
    address = os.environ.get("RAY_ADDRESS") or None
    # NOTE: "local" starts a Ray of this process's own: without it, ray.init() joins any Ray that runs on this
    # machine, which is not what an unset RAY_ADDRESS asks for
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True)
    logger.info("Ray: %s", "connected to " + address if address else "started a local instance")
    return True


def connect_for_later() -> None:
    """``connect``, its ownership kept for the executor that connects next."""
    global _connected_here
    _connected_here = connect() or _connected_here


RAY_ACCELERATORS = {"cuda": "GPU", "npu": "NPU"}  # device type -> the Ray resource of one of its devices


def bundle(device: str) -> dict[str, float]:
    """One rank's share of a node: a CPU, and one device of the rank's type."""
    accelerator = RAY_ACCELERATORS.get(device.split(":")[0])
    return {"CPU": 1.0} | ({accelerator: 1.0} if accelerator else {})


def bundle_places(groups: list[PlacementGroup], tp: int) -> list[RankPlace]:
    """Where each rank's bundle is (rank order: stage by stage, tp rank within), from the placement groups and
    the nodes' table, without asking the actors."""
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    places = []
    for group in groups:
        on_node = placement_group_table(group)["bundles_to_node_id"]
        for tp_rank in range(tp):
            node = nodes[on_node[tp_rank]]
            places.append(RankPlace(node["NodeManagerAddress"], node["NodeID"], node["NodeManagerHostname"]))
    return places


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def custom_resources(one: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in one.items() if k not in ("CPU", "GPU")}
