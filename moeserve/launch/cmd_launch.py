"""``moeserve launch cluster``: the same command on every node (see launch/cluster.py and docs/cluster.md).

Node 0 runs the coordinator: it serves (``moeserve serve``'s front end) or, given prompts, generates them
like ``moeserve generate`` and shuts the cluster down. Every node starts its own ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moeserve.errors import UserError
from moeserve.launch.cmd_generate import add_generation_args, generate, read_prompts, sampling_params
from moeserve.launch.cmd_serve import add_server_args, serve_engine
from moeserve.launch.engine_args import add_engine_args, engine_config

NEEDS_ENGINE_ARGS = False  # added to the ``cluster`` subcommand below

KVSTORE_KEYS = {"url": "kv_store", "host_memory": "kv_host_memory", "salt": "kv_store_salt",
                "timeout": "kv_store_timeout", "probe_interval": "kv_store_probe_interval",
                "cost_rule": "kv_load_cost_rule", "layerwise": "kv_layerwise",
                "write_buffer": "kv_store_write_buffer"}  # [kvstore] key -> engine flag
CLUSTER_KEYS = {"hosts", "master_addr", "master_port", "procs_per_node", "device", "ifname", "ib_hca",
                "ib_gid_index", "join_timeout", "nnodes", "node_rank"}

KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("launch", help="launch moeserve across machines")
    launch_sub = p.add_subparsers(dest="launch_command", required=True)
    c = launch_sub.add_parser("cluster", help="run this node's part of a multi-node deployment",
                              description="Run the same command on every node; node 0 serves.")
    g = c.add_argument_group("cluster")
    g.add_argument("--config", type=Path,
                   help="cluster.toml: [cluster], [engine], [network] and [kvstore] tables (default: none, flags only)")
    g.add_argument("--nnodes", type=int, default=None, help="number of nodes (default: the config's hosts)")
    g.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank (default: found by matching the config's hosts to this node)")
    g.add_argument("--master-addr", default=None, help="node 0's address (default: the config's first host)")
    g.add_argument("--master-port", type=int, default=None,
                   help="control store port; port+1 coordinator, port+2 rank rendezvous (default 29500)")
    g.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: ranks / nnodes)")
    g.add_argument("--ifname", default=None, help="network interface for NCCL / gloo / HCCL sockets (default: the backends' own choice)")
    g.add_argument("--ib-hca", default=None, help="NCCL_IB_HCA, e.g. mlx5_0,mlx5_1 (default: NCCL's choice)")
    g.add_argument("--ib-gid-index", default=None, help="NCCL_IB_GID_INDEX (3 for RoCE v2 on most NICs; default: NCCL's choice)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="another environment variable for every rank (repeatable; default: none)")
    g.add_argument("--join-timeout", type=float, default=None,
                   help="seconds for every node to join (default 120); after it every node exits")
    add_engine_args(c)
    add_server_args(c)
    add_generation_args(c)
    c.set_defaults(func=run)
    return p


def merged_settings(args: argparse.Namespace, parser_defaults: dict) -> tuple[dict, dict[str, str]]:
    """Command-line values win over the config file's; returns (cluster settings, [network] table)."""
    from moeserve.launch.cluster_config import ClusterError, read_config

    raw = read_config(args.config) if args.config else {}
    cluster = dict(raw.get("cluster", {}))
    unknown = set(cluster) - CLUSTER_KEYS
    if unknown:
        raise ClusterError(f"{args.config}: unknown [cluster] key(s) {sorted(unknown)}")
    for key, value in raw.get("engine", {}).items():
        if not hasattr(args, key):
            raise ClusterError(f"{args.config}: [engine] has no setting {key!r}")
        default = parser_defaults.get(key)
        if default is not None and not same_kind(value, default):
            kind = KINDS.get(type(default), type(default).__name__)
            raise ClusterError(f"{args.config}: [engine] {key} = {value!r} must be {kind}, as its flag "
                               f"--{key.replace('_', '-')} takes")
        if getattr(args, key) == parser_defaults.get(key):
            setattr(args, key, value)
    for key, value in raw.get("kvstore", {}).items():
        if key not in KVSTORE_KEYS:
            raise ClusterError(f"{args.config}: [kvstore] has no setting {key!r} (known: {sorted(KVSTORE_KEYS)})")
        if getattr(args, KVSTORE_KEYS[key]) == parser_defaults.get(KVSTORE_KEYS[key]):
            setattr(args, KVSTORE_KEYS[key], value)
    if "device" in cluster and args.device == parser_defaults.get("device"):
        args.device = cluster["device"]
    for key in CLUSTER_KEYS - {"hosts", "device"}:
        if getattr(args, key.replace("-", "_"), None) is not None:
            cluster[key] = getattr(args, key)
    network = {str(k): str(v) for k, v in raw.get("network", {}).items()}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClusterError(f"--env expects KEY=VALUE, got {item!r}")
        network[key] = value
    return cluster, network


def same_kind(value: object, default: object) -> bool:
    """A config value can stand for a flag with this default: bool for bool, a number for float, ..."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def cluster_config(args: argparse.Namespace, parser_defaults: dict):
    from moeserve.launch.cluster_config import ClusterConfig, ClusterError, network_env, node_rank_from_hosts

    cluster, extra = merged_settings(args, parser_defaults)
    hosts = list(cluster.get("hosts", []))
    nnodes = cluster.get("nnodes") or len(hosts)
    if not nnodes:
        raise ClusterError("give --nnodes (or hosts in --config)")
    if hosts and len(hosts) != nnodes:
        raise ClusterError(f"--nnodes {nnodes} but the config lists {len(hosts)} hosts")
    node_rank = cluster.get("node_rank")
    if node_rank is None:
        if not hosts:
            raise ClusterError("give --node-rank (or hosts in --config)")
        node_rank = node_rank_from_hosts(hosts)
    master = cluster.get("master_addr") or (hosts[0] if hosts else None)
    if not master:
        raise ClusterError("give --master-addr (or hosts in --config)")
    env = network_env(cluster.get("ifname") or "", cluster.get("ib_hca") or "",
                      str(cluster.get("ib_gid_index") or ""), args.device, extra)
    cc = ClusterConfig(nnodes=nnodes, node_rank=node_rank, master_addr=master,
                       master_port=cluster.get("master_port") or 29500,
                       procs_per_node=cluster.get("procs_per_node") or 0,
                       join_timeout_s=float(cluster.get("join_timeout") or 120.0))
    return cc, env


def quiet_torch_cpp_logs() -> None:
    """The launcher reports joins and failures itself: keep c10d's C++ retry logs and stack traces (a node
    that is not up yet) off its terminal. Read once, when torch loads; the ranks keep the default."""
    if "torch" not in sys.modules and "TORCH_CPP_LOG_LEVEL" not in os.environ:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
        import torch  # noqa: F401  (loads c10 with that level)

        del os.environ["TORCH_CPP_LOG_LEVEL"]


def run(args: argparse.Namespace) -> int:
    quiet_torch_cpp_logs()
    from moeserve.launch.cluster import run_node
    from moeserve.launch.cluster_config import ClusterError

    defaults = vars(add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(["cluster"]))
    try:
        cc, env = cluster_config(args, defaults)
        roles = role_setup(args, cc)
    except ClusterError as e:
        print(f"moeserve launch cluster: {e}", file=sys.stderr)
        return 2
    if roles is not None:
        from moeserve.launch.cluster_roles import run_roles

        os.environ.update(env)
        return run_roles(args, roles[0], roles[1], defaults["host"])
    config = engine_config(args, progress=cc.node_rank == 0 and not args.json)
    preflight(cc, config, args)
    if args.prompts or args.prompts_file:
        prompts, params = read_prompts(args), sampling_params(args)

        def work(engine) -> int:
            return generate(engine, prompts, params, args.json)
    else:
        work = serve_work(args)
    try:
        return run_node(cc, config, env, work)
    except ClusterError as e:  # this node could not join (node 0 unreachable, or the port taken)
        print(f"moeserve launch cluster: {e}", file=sys.stderr)
        return 1


def role_setup(args: argparse.Namespace, cc):  # noqa: ANN001 - a ClusterConfig
    """(the config's role plan, this node's host) when it has a ``[disaggregation]`` table, else None."""
    from moeserve.launch.cluster_config import ClusterError, read_config
    from moeserve.launch.cluster_roles import role_plan

    raw = read_config(args.config) if args.config else {}
    if "disaggregation" not in raw:
        return None
    if args.prompts or args.prompts_file:
        raise ClusterError("a disaggregated cluster serves; it does not take prompts")
    hosts = list(raw.get("cluster", {}).get("hosts", []))
    plan = role_plan(raw["disaggregation"], hosts)
    return plan, hosts[cc.node_rank]


def preflight(cc, config, args: argparse.Namespace) -> None:
    """This node's own settings, before it joins: device, checkpoint (node 0: tokenizer and, when it will
    serve, its ports), layout. A UserError here is one line and exit 1 on this node."""
    from moeserve.launch.preflight import check_engine, check_ports

    if config.distributed_executor_backend != "mp":
        raise UserError("launch cluster starts every node's ranks itself (--distributed-executor-backend mp); "
                        "on a Ray cluster run moeserve serve --distributed-executor-backend ray instead")
    local_ranks = cc.procs_per_node or -(-config.pp * config.tp // cc.nnodes)
    check_engine(config, need_tokenizer=cc.node_rank == 0, local_ranks=local_ranks)
    if cc.node_rank == 0 and not (args.prompts or args.prompts_file):
        check_ports(args.host, [("--port", args.port), ("--rpc-port", args.rpc_port)])


def serve_work(args: argparse.Namespace):
    """Node 0's job without prompts: ``moeserve serve``'s front end over the cluster's engine."""
    return lambda engine: serve_engine(engine, args)
