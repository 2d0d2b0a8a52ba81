"""``moeserve launch cluster`` for a disaggregated deployment: with a ``[disaggregation]`` table in
``cluster.toml`` the nodes do not form one model; each runs the role the table gives its host, from the same
command on every node (docs/cluster.md, docs/kvstore.md):

- a host in ``prefill`` runs ``moeserve serve --disaggregation-mode prefill`` (its transfer server on
  ``transfer_port`` of that host's address), a host in ``decode`` a decode instance, each on ``port`` and with
  the ``[engine]`` settings (any ``--pp/--tp/--ep`` of one node);
- the ``router`` host (default: the first host) also runs ``moeserve router`` over every instance, on
  ``router_port``.

A role instance runs in the node's own process (as ``moeserve serve``); the router is a child process,
stopped with it. The nodes share no control plane: the router waits for the instances and health-checks
them, as it does when started by hand.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from moeserve.launch.cluster_config import ClusterError

DISAGG_KEYS = {"prefill", "decode", "router", "port", "router_port", "transfer_port", "backend"}


@dataclass(frozen=True)
class RolePlan:
    prefill: tuple[str, ...]  # hosts that each run a prefill instance
    decode: tuple[str, ...]
    router: str  # the host that runs the router
    port: int = 8001  # each instance's HTTP port on its host
    router_port: int = 8000
    transfer_port: int = 7001  # a prefill instance's transfer server
    backend: str = "zmq"  # --kv-transfer-backend of every instance

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ClusterError("[disaggregation] needs at least one prefill and one decode host")
        both = set(self.prefill) & set(self.decode)
        if both:
            raise ClusterError(f"[disaggregation] host(s) {sorted(both)} are given both roles")
        if len({self.port, self.router_port, self.transfer_port}) != 3:
            raise ClusterError("[disaggregation] port, router_port and transfer_port must differ")

    def mode_of(self, host: str) -> str | None:
        """The instance role of ``host`` ("prefill", "decode"), or None (the router alone)."""
        return "prefill" if host in self.prefill else "decode" if host in self.decode else None

    def urls(self, hosts: tuple[str, ...]) -> list[str]:
        return [f"http://{h}:{self.port}" for h in hosts]

    def router_argv(self, bind: str) -> list[str]:
        return ["router", "--prefill", *self.urls(self.prefill), "--decode", *self.urls(self.decode),
                "--host", bind, "--port", str(self.router_port)]


def role_plan(table: dict[str, Any], hosts: list[str]) -> RolePlan:
    """The ``[disaggregation]`` table of a config whose ``[cluster]`` lists ``hosts``."""
    unknown = set(table) - DISAGG_KEYS
    if unknown:
        raise ClusterError(f"unknown [disaggregation] key(s) {sorted(unknown)} (known: {sorted(DISAGG_KEYS)})")
    if not hosts:
        raise ClusterError("[disaggregation] needs the [cluster] hosts")
    prefill, decode = tuple(table.get("prefill", ())), tuple(table.get("decode", ()))
    router = str(table.get("router", hosts[0]))
    strays = [h for h in (*prefill, *decode, router) if h not in hosts]
    if strays:
        raise ClusterError(f"[disaggregation] names host(s) {strays} that are not in [cluster] hosts {hosts}")
    ports = {k: int(table[k]) for k in ("port", "router_port", "transfer_port") if k in table}
    backend = str(table.get("backend", "zmq"))
    return RolePlan(prefill, decode, router, backend=backend, **ports)


def instance_args(args: argparse.Namespace, plan: RolePlan, host: str, mode: str,
                  default_host: str) -> argparse.Namespace:
    """``moeserve serve``'s arguments for this node's instance (the launch's own flags and [engine] kept)."""
    out = argparse.Namespace(**vars(args))
    out.disaggregation_mode = mode
    out.kv_transfer_backend = plan.backend
    out.port = plan.port
    if mode == "prefill":
        out.kv_transfer_addr = f"tcp://{host}:{plan.transfer_port}"
    if args.host == default_host:  # NOTE: the router on another host must reach the instance
        out.host = host
    return out


def run_roles(args: argparse.Namespace, plan: RolePlan, host: str, default_host: str) -> int:
    """This node's part: its instance (in this process) and, on the router host, the router."""
    from moeserve.launch import cmd_serve

    mode = plan.mode_of(host)
    if mode is None and host != plan.router:
        raise ClusterError(f"host {host} has no role in [disaggregation]")
    router = None
    if host == plan.router:
        bind = host if args.host == default_host else args.host
        router = subprocess.Popen([sys.executable, "-m", "moeserve.launch.cli", *plan.router_argv(bind)])
        print(f"[{host}] router on {bind}:{plan.router_port}", file=sys.stderr)
    try:
        if mode is None:
            assert router is not None
            return wait_router(router)
        print(f"[{host}] {mode} instance on port {plan.port}", file=sys.stderr)
        return cmd_serve.run(instance_args(args, plan, host, mode, default_host))
    finally:
        if router is not None and router.poll() is None:
            router.terminate()
            try:
                router.wait(15)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait()


def wait_router(router: subprocess.Popen) -> int:
    """A router-only node: until the router exits; SIGTERM stops it (exit code 0, as a served node's)."""
    stopping = []

    def stop(*_: object) -> None:
        stopping.append(True)
        router.terminate()

    signal.signal(signal.SIGTERM, stop)
    code = router.wait()
    # NOTE: uvicorn raises the SIGTERM it caught again once it has shut down
    return 0 if stopping and code in (0, -signal.SIGTERM) else code
