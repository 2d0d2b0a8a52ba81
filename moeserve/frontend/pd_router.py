"""``moeserve router --prefill URL... --decode URL...``: the OpenAI-compatible front door of a disaggregated
deployment (kvstore/disagg.py).

A request goes first to a prefill instance (prefix affinity on the prompt, as the replica router: the
instance whose index holds the longest prefix, unless the load is out of balance) with ``max_tokens`` 1 and
``kv_transfer_params`` ``{do_remote_decode, transfer_id}``, then, as sent, to the least loaded decode
instance with ``{transfer_id, remote_addr, fingerprint}``; the decode instance's answer (a stream or JSON)
goes back to the client as it comes. A prefill instance that fails costs nothing but time: the decode
instance then computes the prompt itself. A decode instance that fails mid-stream ends its streams with a
typed error event (``decode_instance_failed``); it is marked down at once and by the health check (every
``health_interval_s``), and no request goes to it until its /health answers again.

At start every instance's ``/v1/kv_transfer`` must name its role and one model fingerprint: a mismatch stops
the router with a clear error. /metrics shows the router's counts and each instance's transfer families
(``moeserve_kv_transfer_bytes_total``, ``moeserve_kv_transfer_seconds``, by role and instance).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moeserve.errors import UserError
from moeserve.frontend.pd_metrics import router_metrics
from moeserve.frontend.router import PrefixIndex, choose_replica

CHUNK_CHARS = 128  # the affinity index hashes the prompt text in chunks of this many characters


class RouterSetupError(UserError):
    """The instances behind the router do not fit together (role, model fingerprint) or did not answer."""


@dataclass
class Instance:
    url: str
    role: str
    transfer_addr: str = ""
    up: bool = True
    outstanding: int = 0
    index: PrefixIndex = field(default_factory=lambda: PrefixIndex(1 << 16))


def prompt_chunks(body: dict[str, Any]) -> list[int]:
    """Chain hashes of the prompt's text (completions) or messages (chat), chunk by chunk."""
    text = json.dumps(body.get("messages")) if "messages" in body else json.dumps(body.get("prompt"))
    out, parent = [], b""
    for i in range(0, len(text) - len(text) % CHUNK_CHARS, CHUNK_CHARS):
        parent = hashlib.sha256(parent + text[i:i + CHUNK_CHARS].encode()).digest()[:8]
        out.append(int.from_bytes(parent, "little"))
    return out


def prefill_body(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """The request as a prefill instance gets it: one token, no stream, and the transfer to hold."""
    out = copy.deepcopy(body)
    for name in ("stream", "stream_options", "max_completion_tokens", "min_tokens", "n", "best_of", "logprobs",
                 "top_logprobs"):
        out.pop(name, None)
    out["max_tokens"] = 1
    out["kv_transfer_params"] = {"transfer_id": transfer_id, "do_remote_decode": True}
    return out


def error_event(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "code": "decode_instance_failed"}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class DisaggRouter:
    def __init__(self, prefill: list[str], decode: list[str], health_interval_s: float = 1.0,
                 timeout_s: float = 600.0):
        if not prefill or not decode:
            raise RouterSetupError("the router needs at least one --prefill and one --decode instance")
        self.prefill = [Instance(u.rstrip("/"), "prefill") for u in prefill]
        self.decode = [Instance(u.rstrip("/"), "decode") for u in decode]
        self.health_interval_s = health_interval_s
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))
        self.fingerprint = ""
        self.counts: dict[tuple[str, str, str], int] = {}
        self._counter = 0
        self._health: asyncio.Task | None = None
        self.app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self._routes()

    # ---- start ----
    async def start(self, wait_s: float = 600.0) -> None:
        """Ask every instance for its role and model (waiting for those still loading), then check them."""
        deadline = time.monotonic() + wait_s
        infos = {}
        for inst in [*self.prefill, *self.decode]:
            while True:
                try:  # NOTE: an instance answers /v1/kv_transfer before its engine is up, /health only after
                    health = await self.client.get(f"{inst.url}/health", timeout=2.0)
                    r = await self.client.get(f"{inst.url}/v1/kv_transfer", timeout=2.0)
                    if health.status_code == 200 and r.status_code == 200:
                        infos[inst.url] = r.json()
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RouterSetupError(f"{inst.role} instance {inst.url} did not answer /v1/kv_transfer")
                await asyncio.sleep(0.5)
        self._check(infos)
        self._health = asyncio.create_task(self._watch())

    def _check(self, infos: dict[str, dict]) -> None:
        for inst in [*self.prefill, *self.decode]:
            info = infos[inst.url]
            if info.get("mode") != inst.role:
                raise RouterSetupError(f"{inst.url} is not a {inst.role} instance (its --disaggregation-mode is "
                                       f"{info.get('mode') or 'off'!r})")
            inst.transfer_addr = info.get("transfer_addr", "")
        prints = {inst.url: infos[inst.url].get("fingerprint") for inst in [*self.prefill, *self.decode]}
        if len(set(prints.values())) != 1:
            raise RouterSetupError("model fingerprint mismatch: every instance must serve the same model ("
                                   + ", ".join(f"{u} has {p}" for u, p in prints.items()) + ")")
        self.fingerprint = str(next(iter(prints.values())))
        backends = {inst.url: infos[inst.url].get("backend") for inst in [*self.prefill, *self.decode]}
        if len(set(backends.values())) != 1:
            raise RouterSetupError("every instance must use one --kv-transfer-backend ("
                                   + ", ".join(f"{u} has {b}" for u, b in backends.items()) + ")")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self._probe(i) for i in [*self.prefill, *self.decode]))

    async def _probe(self, inst: Instance) -> None:
        try:
            r = await self.client.get(f"{inst.url}/health", timeout=max(0.5, self.health_interval_s))
            inst.up = r.status_code == 200
        except httpx.HTTPError:
            inst.up = False

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
        await self.client.aclose()

    # ---- one request ----
    def _count(self, inst: Instance, outcome: str) -> None:
        key = (inst.role, inst.url, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _pick_prefill(self, chunks: list[int]) -> Instance | None:
        live = [i for i in self.prefill if i.up]
        if not live:
            return None
        self._counter += 1
        best = choose_replica([i.index.match(chunks) for i in live], [i.outstanding for i in live],
                              counter=self._counter, balance_abs_tokens=8)
        return live[best]

    def _pick_decode(self) -> Instance | None:
        live = [i for i in self.decode if i.up]
        return min(live, key=lambda i: i.outstanding) if live else None

    async def _prefill(self, path: str, body: dict, headers: dict) -> dict | Response | None:
        """Run the prompt on a prefill instance: the decode side's transfer parameters, a client error to
        return as is, or None (no prefill instance, or it failed: the decode instance computes the prompt)."""
        chunks = prompt_chunks(body)
        inst = self._pick_prefill(chunks)
        if inst is None:
            return None
        transfer_id = uuid.uuid4().hex
        inst.outstanding += 1
        try:
            r = await self.client.post(f"{inst.url}{path}", json=prefill_body(body, transfer_id), headers=headers)
        except httpx.HTTPError:
            inst.up = False
            self._count(inst, "failed")
            return None
        finally:
            inst.outstanding -= 1
        if 400 <= r.status_code < 500:
            self._count(inst, "refused")
            return Response(r.content, r.status_code, media_type="application/json")
        if r.status_code != 200:
            self._count(inst, "failed")
            return None
        self._count(inst, "ok")
        inst.index.insert(chunks)
        return {"transfer_id": transfer_id, "remote_addr": inst.transfer_addr, "fingerprint": self.fingerprint}

    async def handle(self, request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return _error(400, "bad_request", "the body must be a JSON object")
        if "kv_transfer_params" in body:
            return _error(400, "bad_request", "kv_transfer_params is set by the router")
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        transfer = await self._prefill(path, body, headers)
        if isinstance(transfer, Response):
            return transfer
        inst = self._pick_decode()
        if inst is None:
            return _error(503, "no_decode_instance", "no decode instance is up")
        if transfer is not None:
            body = {**body, "kv_transfer_params": transfer}
        if body.get("stream"):
            return StreamingResponse(self._stream(inst, path, body, headers), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        inst.outstanding += 1
        try:
            r = await self.client.post(f"{inst.url}{path}", json=body, headers=headers)
        except httpx.HTTPError as e:
            inst.up = False
            self._count(inst, "failed")
            return _error(502, "decode_instance_failed", f"decode instance {inst.url} failed: {e}")
        finally:
            inst.outstanding -= 1
        self._count(inst, "ok" if r.status_code == 200 else "refused")
        return Response(r.content, r.status_code, media_type="application/json")

    async def _stream(self, inst: Instance, path: str, body: dict, headers: dict) -> AsyncIterator[bytes]:
        inst.outstanding += 1
        try:
            async with self.client.stream("POST", f"{inst.url}{path}", json=body, headers=headers) as r:
                async for chunk in r.aiter_raw():
                    yield chunk
            self._count(inst, "ok")
        except httpx.HTTPError as e:
            inst.up = False
            self._count(inst, "failed")
            yield error_event(f"decode instance {inst.url} failed mid-stream: {type(e).__name__}")
        finally:
            inst.outstanding -= 1

    # ---- routes ----
    def _routes(self) -> None:
        app = self.app

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self.handle(request, "/v1/completions")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self.handle(request, "/v1/chat/completions")

        @app.get("/health")
        async def health() -> JSONResponse:
            ok = any(i.up for i in self.decode)
            return JSONResponse({"status": "ready" if ok else "unavailable", "instances": self.instances()},
                                200 if ok else 503)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            inst = self._pick_decode() or self.decode[0]
            r = await self.client.get(f"{inst.url}/v1/models", headers=dict(request.headers.items()))
            return Response(r.content, r.status_code, media_type="application/json")

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(await self.metrics_text(), media_type="text/plain; version=0.0.4")

    def instances(self) -> list[dict[str, Any]]:
        return [{"url": i.url, "role": i.role, "up": i.up, "outstanding": i.outstanding}
                for i in [*self.prefill, *self.decode]]

    async def metrics_text(self) -> str:
        """The router's own series, then each instance's transfer families labelled with its URL."""
        instances = [*self.prefill, *self.decode]
        texts = await asyncio.gather(*(self._scrape(i) for i in instances))
        return router_metrics(self.counts, [(i.role, i.url, i.up) for i in instances], texts)

    async def _scrape(self, inst: Instance) -> str:
        if not inst.up:
            return ""
        try:
            r = await self.client.get(f"{inst.url}/metrics", timeout=2.0)
            return r.text if r.status_code == 200 else ""
        except httpx.HTTPError:
            return ""


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error" if status >= 500 else
                                   "invalid_request_error", "code": code}}, status)
