"""``moeserve serve``: the OpenAI-compatible HTTP API and the ZeroMQ token RPC in front of the engine."""

from __future__ import annotations

import argparse

from moeserve.errors import UserError
from moeserve.launch.engine_args import engine_config

NEEDS_ENGINE_ARGS = True


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI API) and ZeroMQ token RPC")
    add_server_args(p)
    return p


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface for HTTP and RPC (default 127.0.0.1; another opens the server, with a warning)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port")
    g.add_argument("--rpc-port", type=int, default=5555, help="ZeroMQ token RPC port")
    g.add_argument("--replicas", type=int, default=1, help="data-parallel copies of the model (processes)")
    g.add_argument("--routing", default="affinity", choices=("affinity", "load", "round_robin"),
                   help="how requests are spread over replicas")
    g.add_argument("--api-key", default=None,
                   help="key(s), comma-separated, required by every route but /health and by the RPC "
                        "(default: the MOESERVE_API_KEY environment variable)")
    g.add_argument("--audit-log", default=None, help="append one JSON line per request, never the text (default: no audit log)")
    g.add_argument("--served-model-name", default="", help="the model id of /v1/models (default: the directory name)")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight")
    g.add_argument("--replica-threads", type=int, default=0, help="torch threads per replica (default: cores / N)")
    g.add_argument("--reasoning-parser", default=None, choices=("deepseek_r1",),
                   help="split R1's <think>...</think> into reasoning_content (and the RPC's 'reasoning' field)")
    g.add_argument("--tool-call-parser", default=None, choices=("deepseek_v3",),
                   help="parse DeepSeek-V3's tool-call format into tool_calls (tool_choice 'auto')")
    g.add_argument("--expert-metrics-top-k", type=int, default=4,
                   help="per-expert Prometheus series: the K hottest and K coldest experts of each MoE layer")
    g.add_argument("--expert-metrics-all", action="store_true",
                   help="per-expert Prometheus series for every expert of every layer (layers x experts series)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-queued-requests", type=int, default=1024,
                     help="requests admitted and not finished, at most; past it: HTTP 429 / RPC busy")
    lim.add_argument("--max-tokens-in-flight", type=int, default=1 << 20,
                     help="prompt + max_tokens over the admitted requests, at most; past it: 429 / busy")
    lim.add_argument("--max-prompt-tokens", type=int, default=0, help="0 = the context length")
    lim.add_argument("--max-tokens-limit", type=int, default=0, help="largest max_tokens (0 = the context length)")
    lim.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    lim.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="largest RPC frame or HTTP body")


def server_config(args: argparse.Namespace, engine=None):  # noqa: ANN001 - an EngineConfig, built once by run
    """The server's settings from the command line (``engine``: its engine's, where already built)."""
    from moeserve.frontend.limits import ServerLimits
    from moeserve.frontend.load_metrics import LoadMetricsConfig
    from moeserve.frontend.server_config import ServerConfig

    limits = ServerLimits(max_queued_requests=args.max_queued_requests, max_tokens_in_flight=args.max_tokens_in_flight,
                          max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                          max_n=args.max_n, max_frame_bytes=args.max_frame_bytes)
    return ServerConfig(engine=engine or engine_config(args, progress=False), host=args.host, port=args.port,
                        rpc_port=args.rpc_port, replicas=args.replicas, api_key=args.api_key,
                        audit_log=args.audit_log, served_model_name=args.served_model_name, routing=args.routing,
                        limits=limits, drain_timeout_s=args.drain_timeout, replica_threads=args.replica_threads,
                        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
                        expert_metrics=LoadMetricsConfig(args.expert_metrics_top_k, args.expert_metrics_all),
                        freeze_gc=True)


def run(args: argparse.Namespace) -> int:
    import logging

    from moeserve.launch.preflight import check_engine, check_ports

    # before the server's own imports, so that a wrong argument is reported at once
    settings = engine_config(args, progress=False)
    check_engine(settings)
    check_ports(args.host, [("--port", args.port), ("--rpc-port", args.rpc_port)])
    if settings.distributed_executor_backend == "ray" and settings.is_distributed and args.replicas == 1:
        # the ranks' actors start (and import the rank code) while this process loads the server
        try:
            from moeserve.coordinator.ray_actor import prestart
        except ImportError as e:
            raise UserError(f"--distributed-executor-backend ray needs Ray ({e}): pip install 'moeserve[ray]'") from e
        prestart(settings.parallel_dims, settings.device)
    from moeserve.frontend.server import run_server

    logging.getLogger("moeserve.frontend.server").setLevel(logging.INFO)  # the "ready" line with the URLs
    try:
        config = server_config(args, settings)
    except ValueError as e:
        raise UserError(str(e)) from e
    run_server(config)
    return 0


def serve_engine(engine, args: argparse.Namespace) -> int:
    """Serve an engine that is already up: node 0 of ``moeserve launch cluster``. Blocks until SIGTERM or
    Ctrl-C, then drains like ``moeserve serve``."""
    from moeserve.frontend.server import run_server

    config = server_config(args)
    if config.replicas != 1:
        raise UserError("--replicas is not supported (the cluster is one replica)")
    run_server(config, engine)
    return 0
