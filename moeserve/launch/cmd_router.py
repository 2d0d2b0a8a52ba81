"""``moeserve router --prefill URL... --decode URL...``: the front door of a disaggregated deployment
(frontend/pd_router.py)."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("router", help="route requests over prefill and decode instances (disaggregated serving)")
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                   help="prefill instances (`moeserve serve --disaggregation-mode prefill`), e.g. http://h:8001")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL",
                   help="decode instances (`moeserve serve --disaggregation-mode decode`)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between health checks of the instances (a failed one gets no request)")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds to wait for the instances to answer at start")
    return p


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from moeserve.frontend.pd_router import DisaggRouter

    router = DisaggRouter(args.prefill, args.decode, args.health_interval)
    try:
        await router.start(args.start_timeout)
        config = uvicorn.Config(router.app, host=args.host, port=args.port, log_level="warning", lifespan="off",
                                access_log=False)
        server = uvicorn.Server(config)
        logging.getLogger(__name__).setLevel(logging.INFO)
        logger.info("moeserve router ready: http://%s:%d/v1 (%d prefill, %d decode)", args.host, args.port,
                    len(args.prefill), len(args.decode))
        await server.serve()
    finally:
        await router.close()


def run(args: argparse.Namespace) -> int:
    import asyncio

    asyncio.run(serve(args))
    return 0
