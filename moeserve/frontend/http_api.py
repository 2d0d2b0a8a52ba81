"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (JSON or
server-sent events ending in ``data: [DONE]``), /health and /metrics.

Every route but /health needs the API key when one is set. A client that disconnects has its requests
aborted at once (streaming: Starlette cancels the body iterator; otherwise a watcher polls the connection).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import moeserve
from moeserve.frontend.auth import ApiKeys
from moeserve.frontend.chat_template import ChatTemplate
from moeserve.frontend.errors import FrameTooLarge, FrontendError, NotFound, UnsupportedMediaType
from moeserve.frontend.limits import Ticket
from moeserve.frontend.metrics import CONTENT_TYPE
from moeserve.frontend.openai_api import ChatRequest, CompletionRequest, error_body, parse_body
from moeserve.frontend.openai_shapes import ChoiceState, ResponseShape
from moeserve.frontend.openai_tools import ChatSetup, chat_setup
from moeserve.frontend.openapi import (
    ChatCompletion,
    Completion,
    Health,
    ModelList,
    error_responses,
    generation_responses,
    install_openapi,
    request_body,
)
from moeserve.frontend.reasoning import prompt_opens_reasoning
from moeserve.frontend.service import FinalEvent, GenerateRequest, GenerationService, TokenEvent

T = TypeVar("T")
Event = tuple[int, TokenEvent | FinalEvent]


class HttpApi:
    def __init__(self, service: GenerationService, keys: ApiKeys, model_name: str,
                 reasoning_parser: str | None = None, tool_call_parser: str | None = None):
        self.service = service
        self.reasoning_parser, self.tool_call_parser = reasoning_parser, tool_call_parser
        self.keys = keys
        self.model_name = model_name
        self.template = ChatTemplate(service.tokenizer)
        self.created = int(time.time())
        # this instance's role in prefill/decode disaggregation, for `moeserve router` (set once loaded)
        self.kv_transfer_info: dict[str, Any] = {"mode": ""}
        self._ids = itertools.count()
        self.app = FastAPI(title="moeserve", version=moeserve.__version__, docs_url=None, redoc_url=None,
                           openapi_url=None, description="OpenAI-compatible API of moeserve")
        install_error_handlers(self.app)
        self._routes()
        install_openapi(self.app, [CompletionRequest, ChatRequest])

    def _routes(self) -> None:
        app = self.app

        @app.get("/health", responses={200: {"model": Health, "description": "ready"},
                                       503: {"model": Health, "description": "loading, recovering, draining or failed"}})
        async def health() -> JSONResponse:
            state = self.service.health
            retry = {"Retry-After": "2"} if state in ("loading", "recovering") else None
            return JSONResponse({"status": state}, 200 if state == "ready" else 503, headers=retry)

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> JSONResponse:  # behind the API key, as every route but /health
            self.keys.check_bearer(request.headers.get("authorization"))
            return JSONResponse(app.openapi())

        @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))
        async def metrics(request: Request) -> Response:
            self.keys.check_bearer(request.headers.get("authorization"))
            return Response(self.service.metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/v1/kv_transfer", include_in_schema=False)
        async def kv_transfer(request: Request) -> JSONResponse:  # what `moeserve router` checks at start
            self.keys.check_bearer(request.headers.get("authorization"))
            return JSONResponse(self.kv_transfer_info)

        @app.get("/v1/models", responses={200: {"model": ModelList, "description": "the served model"},
                                          **error_responses(401)})
        async def models(request: Request) -> JSONResponse:
            self.keys.check_bearer(request.headers.get("authorization"))
            return JSONResponse({"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": self.created, "owned_by": "moeserve",
                "max_model_len": self.service.model.max_model_len}]})

        @app.post("/v1/completions", responses=generation_responses(Completion),
                  openapi_extra=request_body(CompletionRequest))
        async def completions(request: Request) -> Response:
            return await self._handle(request, chat=False)

        @app.post("/v1/chat/completions", responses=generation_responses(ChatCompletion),
                  openapi_extra=request_body(ChatRequest))
        async def chat_completions(request: Request) -> Response:
            return await self._handle(request, chat=True)

    # ---- one request ----
    async def _handle(self, request: Request, chat: bool) -> Response:
        try:
            kid = self.keys.check_bearer(request.headers.get("authorization"))
            body = parse_body(await self._read_body(request), ChatRequest if chat else CompletionRequest,
                              self.service.limits.max_frame_bytes)
            if body.model != self.model_name:
                raise NotFound(f"the model {body.model!r} does not exist; this server serves "
                               f"{self.model_name!r}", "model")
            reqs, num_prompt, setup = self._requests(body, chat, kid)
            ticket = self.service.admit(reqs)
        except FrontendError as e:
            self.service.refused(e, "http")
            raise
        shape = ResponseShape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", self.model_name,
                              int(time.time()), self.service.tokenizer, len(reqs), num_prompt,
                              want_logprobs=bool(body.logprobs) if chat else body.logprobs is not None, setup=setup)
        events = self._events(reqs, ticket)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(shape, events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await _until_disconnect(request, shape.collect(events))
        return JSONResponse(result)

    async def _read_body(self, request: Request) -> bytes:
        check_content_type(request.headers.get("content-type"))
        limit = self.service.limits.max_frame_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise FrameTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise FrameTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _requests(self, body: Any, chat: bool, kid: str | None) -> tuple[list[GenerateRequest], int, ChatSetup]:
        """The engine requests of one HTTP request (prompts x n, choice index = prompt * n + j), the
        number of prompt tokens it counts once per prompt, and what the output is parsed into."""
        svc = self.service
        text = ""
        if chat:
            tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools] if body.tools else None
            text = self.template.render([m.as_template_input() for m in body.messages], body.add_generation_prompt,
                                        tools, body.chat_template_kwargs)
            tok = svc.tokenizer
            prompts: list[list[int]] = [tok.encode(text, add_bos=False) if tok is not None else []]
        else:
            prompts = [svc.tokenize(p) if isinstance(p, str) else p for p in body.prompts()]
        setup = chat_setup(body, self.reasoning_parser, self.tool_call_parser, prompt_opens_reasoning(text), chat)
        base = next(self._ids)
        reqs = []
        cap = svc.limits.max_tokens or svc.model.max_model_len  # a request that names no max_tokens gets
        for p_index, ids in enumerate(prompts):                 # a default within the server's limit
            for j in range(body.n):
                default = max(1, min(cap, svc.model.max_model_len - len(ids))) if chat else min(cap, 16)
                params = body.params(j, default)
                if setup.structured_output is not None:
                    params = dataclasses.replace(params, structured_output=setup.structured_output)
                reqs.append(svc.prepare(f"http-{base}-{p_index * body.n + j}", ids, params, n=body.n,
                                        key_id=kid, protocol="http"))
        return reqs, sum(len(p) for p in prompts), setup

    async def _events(self, reqs: list[GenerateRequest], ticket: Ticket) -> AsyncIterator[Event]:
        """Every choice's events, interleaved as they come; leaving early aborts every choice."""
        try:
            if len(reqs) == 1:
                async for ev in self.service.generate(reqs[0], ticket):
                    yield 0, ev
                return
            async for item in _merge([self.service.generate(r, ticket) for r in reqs]):
                yield item
        finally:
            ticket.release()

    async def _sse(self, shape: ResponseShape, events: AsyncIterator[Event], include_usage: bool
                   ) -> AsyncIterator[bytes]:
        try:
            if shape.chat:
                for i in range(shape.num_choices):
                    yield _sse(shape.chunk(i, ChoiceState.role_delta()))
            async for index, ev in events:
                chunk = shape.stream_event(index, ev)
                if chunk is not None:
                    yield _sse(chunk)
            if include_usage:
                yield _sse(shape.usage_chunk())
        except FrontendError as e:
            yield _sse(error_body(e.code, e.message, e.openai_type, e.param))
        yield b"data: [DONE]\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: typed front-end errors, Starlette's (404, 405), FastAPI's 422 for a route
    that declares its parameters (answered as a 400 naming the field), and a bug (a 500 body, still logged)."""

    @app.exception_handler(FrontendError)
    async def frontend_error(_request: Request, e: FrontendError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(error_body(e.code, e.message, e.openai_type, e.param), e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else "bad_request"
        return JSONResponse(error_body(code, str(e.detail), "invalid_request_error", None), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]  # a route that declares its parameters: FastAPI's 422, as our 400
        loc = ".".join(str(p) for p in err["loc"][1:]) or None
        message = f"field {loc!r}: {err['msg']}" if loc else str(err["msg"])
        return JSONResponse(error_body("bad_request", message, "invalid_request_error", loc), 400)

    @app.exception_handler(Exception)
    async def bug(_request: Request, e: Exception) -> JSONResponse:  # still logged with its traceback
        return JSONResponse(error_body("internal", f"internal error ({type(e).__name__})", "server_error",
                                       None), 500)


def check_content_type(header: str | None) -> None:
    """JSON bodies only: ``application/json`` (or ``application/*+json``), UTF-8. No header at all is taken as
    JSON, as FastAPI does (curl -d sends a form type, so it needs ``-H 'Content-Type: application/json'``)."""
    if header is None:
        return
    media_type, _, params = header.partition(";")
    media_type = media_type.strip().lower()
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if media_type != "application/json" and not (media_type.startswith("application/")
                                                 and media_type.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type {media_type or header!r} is not supported: send the body as "
                                   "JSON with Content-Type: application/json")
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset!r} is not supported: send UTF-8 JSON (Content-Type: "
                                   "application/json; charset=utf-8)")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _merge(gens: list[AsyncIterator[TokenEvent | FinalEvent]]) -> AsyncIterator[Event]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[TokenEvent | FinalEvent]) -> None:
        try:
            async for ev in gen:
                queue.put_nowait((i, ev))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, ev = await queue.get()
            if ev is None:
                remaining -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return {}  # type: ignore[return-value]  # nobody is there to read it
    finally:
        if not task.done():
            task.cancel()
