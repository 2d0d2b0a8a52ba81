"""HTTP routes of expert load: ``GET /v1/expert_load`` (JSON), the live page ``/dashboard`` with its assets
and its server-sent events, and the Prometheus collector of the same figures.

``install`` adds them to the front end's FastAPI app. Every route needs the API key when one is set, like
the rest of HTTP; a browser cannot put a header on an ``EventSource``, so the dashboard's routes also take
the key as a ``key`` query parameter (the page passes on the one it was opened with).
"""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moeserve.coordinator.expert_load import LoadView, sum_views
from moeserve.dashboard.state import dashboard_states, load_json
from moeserve.frontend.auth import ApiKeys
from moeserve.frontend.errors import BadRequest, NotFound, Unavailable
from moeserve.frontend.load_metrics import ExpertLoadCollector, LoadMetricsConfig

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
EVENT_INTERVAL_S = 0.5  # the page updates at least once a second


def load_views(service: Any) -> list[LoadView | None]:
    """The latest expert-load view of each replica: an in-process engine's own, or the one a replica process
    sent last (``ReplicaBackend.load_view``; None until its first)."""
    views = []
    for backend in service.backends:
        monitor = getattr(getattr(backend, "engine", None), "expert_load", None)
        views.append(getattr(backend, "load_view", None) if monitor is None else monitor.view)
    return views


def install(app: FastAPI, service: Any, keys: ApiKeys, config: LoadMetricsConfig | None = None) -> None:
    """Register the expert-load collector on the service's metrics and add the routes to ``app``."""
    config = config or LoadMetricsConfig()
    collector = ExpertLoadCollector(lambda: load_views(service), config.top_k, config.all_experts)
    service.metrics.registry.register(collector)
    service.metrics.extra_text.append(collector.text)
    app.include_router(ExpertLoadRoutes(service, keys).router)


class ExpertLoadRoutes:
    def __init__(self, service: Any, keys: ApiKeys):
        self.service = service
        self.keys = keys
        self.router = APIRouter()
        r = self.router
        unavailable: dict[int | str, dict[str, Any]] = {503: {"description": "no expert-load statistics yet"}}
        r.add_api_route("/v1/expert_load", self.expert_load, methods=["GET"], responses=unavailable)
        # the page, its assets and its event stream are not an API: left out of /openapi.json
        r.add_api_route("/dashboard", self.page, methods=["GET"], include_in_schema=False)
        r.add_api_route("/dashboard/assets/{name}", self.asset, methods=["GET"], include_in_schema=False)
        r.add_api_route("/dashboard/events", self.events, methods=["GET"], include_in_schema=False)
        r.add_api_route("/admin/rebalance", self.rebalance, methods=["POST"], status_code=202,
                        responses=unavailable)

    def _auth(self, request: Request, allow_query: bool = False) -> None:
        header = request.headers.get("authorization")
        key = request.query_params.get("key") if allow_query else None
        self.keys.check_bearer(header if header or key is None else f"Bearer {key}")

    def view(self, replica: int | None = None) -> LoadView:
        """Replica ``replica``'s view, or (None) every replica's summed (``sum_views``)."""
        views = load_views(self.service)
        if replica is not None:
            if not 0 <= replica < len(views):
                raise BadRequest(f"replica must be in [0, {len(views)}), got {replica}")
            chosen = views[replica]
            if chosen is None:
                raise Unavailable(f"no expert-load statistics from replica {replica} yet")
            return chosen
        live = [v for v in views if v is not None]
        if not live:
            raise Unavailable("no expert-load statistics yet (the engine is loading)")
        return sum_views(live)

    async def expert_load(self, request: Request, scope: Literal["total", "window"] = "total",
                          replica: int | None = None) -> JSONResponse:
        """Routed tokens per MoE layer and expert: since start (``scope=total``) or in the latest window; of
        one replica (``replica``) or, by default, of every replica summed."""
        self._auth(request)
        views = load_views(self.service)
        body = load_json(self.view(replica), scope)
        body.update({"replica": replica, "replicas": len(views),
                     "replicas_reporting": sum(1 for v in views if v is not None)})
        return JSONResponse(body)

    async def rebalance(self, request: Request) -> JSONResponse:
        """Ask the engine for an expert rebalance now (it plans at its next step boundary, then stages the
        new placement in the background); 202 with the rebalances so far."""
        self._auth(request)
        live = []
        for backend in self.service.backends:
            monitor = getattr(getattr(backend, "engine", None), "expert_load", None)
            if monitor is not None and monitor.rebalancer is not None:
                live.append(monitor.rebalancer.request)
            view = getattr(backend, "load_view", None)  # a replica process: the placement says EP is on
            if monitor is None and view is not None and view.phy2log is not None:
                live.append(backend.request_rebalance)
        if not live:
            raise BadRequest("online rebalancing needs expert parallelism over stage workers (--tp N with "
                             "--ep N, N > 1)")
        for request_rebalance in live:
            request_rebalance()  # an idle engine takes it up within half a second
        view = self.view()
        return JSONResponse({"status": "requested", "rebalances": [r.__dict__ for r in view.rebalances]}, 202)

    async def page(self, request: Request) -> Response:
        self._auth(request, allow_query=True)
        key = request.query_params.get("key")
        suffix = html.escape("?" + urlencode({"key": key})) if key else ""
        page = _asset("index.html").replace(b"__SUFFIX__", suffix.encode())
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    async def asset(self, request: Request, name: str) -> Response:
        self._auth(request, allow_query=True)
        if name not in ASSETS:
            raise NotFound(f"no dashboard asset {name!r}")
        return Response(_asset(name), media_type=ASSETS[name])

    async def events(self, request: Request) -> StreamingResponse:
        self._auth(request, allow_query=True)
        return StreamingResponse(self._stream(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _stream(self, request: Request) -> AsyncIterator[bytes]:
        """One event per interval: the whole state (a page that connects late needs no history), of every
        replica, after their sum when there are several."""
        sent: list[LoadView] = []
        cached: dict[str, Any] = {}
        while not await request.is_disconnected():
            views = [v for v in load_views(self.service) if v is not None]
            if views:
                if len(views) != len(sent) or any(a is not b for a, b in zip(views, sent)):
                    sent = views
                    cached = await asyncio.to_thread(dashboard_states, sent)
                payload = json.dumps(cached, separators=(",", ":"))
                yield b"event: load\ndata: " + payload.encode() + b"\n\n"
            else:
                yield b": waiting for the engine\n\n"
            await asyncio.sleep(EVENT_INTERVAL_S)


def _asset(name: str) -> bytes:
    return resources.files("moeserve.dashboard").joinpath("assets", name).read_bytes()
