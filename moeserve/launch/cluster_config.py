"""A node's part of ``moeserve launch cluster`` before anything starts: the cluster's configuration
(``cluster.toml`` and the flags), which node this is, and the network settings that pin every backend to
the right interfaces (cluster.py runs the node from these)."""

from __future__ import annotations

import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.errors import UserError


class ClusterError(UserError, RuntimeError):
    """The cluster could not form or lost a node; the message names the node and the cause."""


@dataclass(frozen=True)
class ClusterConfig:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int = 29500
    procs_per_node: int = 0  # 0 = ranks / nnodes
    join_timeout_s: float = 120.0
    network_env: dict[str, str] = field(default_factory=dict)  # exported to this launcher and its ranks

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ClusterError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ClusterError(f"node rank {self.node_rank} is outside [0, {self.nnodes})")
        if not 0 < self.master_port < 65534:
            raise ClusterError(f"master port {self.master_port} must leave room for port + 2 below 65536")

    @property
    def coordinator_port(self) -> int:
        return self.master_port + 1

    @property
    def dist_port(self) -> int:
        return self.master_port + 2

    def ranks_per_node(self, world_size: int) -> int:
        per_node = self.procs_per_node or world_size // self.nnodes
        if per_node * self.nnodes != world_size:
            raise ClusterError(f"{self.nnodes} nodes x {per_node} ranks per node != {world_size} ranks "
                               f"(pp x tp); set --procs-per-node so that they match")
        return per_node


def network_env(ifname: str = "", ib_hca: str = "", ib_gid_index: str = "", device: str = "cpu",
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that pins NCCL / gloo / HCCL to the right interface and InfiniBand / RoCE devices.

    ``--ifname`` sets the socket interface of every backend (and HCCL_IF_IP to that interface's address);
    ``--ib-hca`` and ``--ib-gid-index`` select the RDMA devices (RoCE v2 usually needs GID index 3). Values
    from the config's ``[network]`` table (``extra``) come last and win."""
    env: dict[str, str] = {}
    if ifname:
        env.update(GLOO_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=ifname)
        if device.startswith("npu"):
            env["HCCL_SOCKET_IFNAME"] = ifname
            address = interface_address(ifname)
            if address:
                env["HCCL_IF_IP"] = address
    if ib_hca:
        env["NCCL_IB_HCA"] = ib_hca
    if ib_gid_index:
        env["NCCL_IB_GID_INDEX"] = ib_gid_index
    env.update(extra or {})
    return env


def interface_address(ifname: str) -> str | None:
    import psutil

    for addr in psutil.net_if_addrs().get(ifname, []):
        if addr.family == socket.AF_INET:
            return addr.address
    return None


def local_addresses() -> set[str]:
    import psutil

    found = {socket.gethostname()}
    for addrs in psutil.net_if_addrs().values():
        found.update(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return found


def read_config(path: Path) -> dict[str, Any]:
    """A cluster.toml: ``[cluster]`` (hosts, master_port, procs_per_node, device, ifname, ib_hca,
    ib_gid_index, join_timeout), ``[engine]`` (any engine flag by its long name: model, pp, tp, ep, ...)
    ``[network]`` (environment variables for every rank) and ``[kvstore]`` (url, host_memory, salt, timeout,
    probe_interval, cost_rule, layerwise, write_buffer) and ``[disaggregation]`` (a role per host:
    launch/cluster_roles.py). See docs/cluster.md."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ClusterError(f"{path}: {e}") from e
    unknown = set(raw) - {"cluster", "engine", "network", "kvstore", "disaggregation"}
    if unknown:
        raise ClusterError(f"{path}: unknown table(s) {sorted(unknown)} (expected cluster, engine, network, "
                           "kvstore, disaggregation)")
    return raw


def node_rank_from_hosts(hosts: list[str]) -> int:
    """This node's index in the config's host list, found by its own addresses and hostname."""
    mine = local_addresses()
    matches = [i for i, host in enumerate(hosts) if host in mine]
    if len(matches) != 1:
        raise ClusterError(f"cannot tell this node's rank from hosts {hosts} (this node: {sorted(mine)}); "
                           f"pass --node-rank")
    return matches[0]


def print_network(cc: ClusterConfig, env: dict[str, str], out=sys.stderr) -> None:
    print(f"[node {cc.node_rank}/{cc.nnodes}] master {cc.master_addr}:{cc.master_port} "
          f"(coordinator :{cc.coordinator_port}, ranks :{cc.dist_port})", file=out)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none (backend defaults)"
    print(f"[node {cc.node_rank}] network settings: {settings}", file=out)
