"""The OpenAPI schema of the HTTP API (served at ``/openapi.json``): request bodies from the very pydantic
models that validate them, the response shapes, and every status a route answers with its error body.

The routes read their bodies themselves (``parse_body``: size limit, Content-Type, UTF-8, OpenAI-shaped
400s), so FastAPI does not see the request models; ``install_openapi`` adds them to the schema. A schema
fuzzer (tests/test_http_fuzz.py) checks the server against this document: no 5xx, only documented statuses
and content types, and response bodies that match.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
# one server-sent event (before Open API 3.2, a text/event-stream schema describes each event)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "description": "a JSON chunk (its choices' "
                                                                         "deltas, or usage, or an error body), "
                                                                         "and last the text [DONE]"}}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    """Every error, as OpenAI sends it: ``param`` names the request field at fault, where there is one."""

    error: ErrorDetail


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int | None = None  # with --reasoning-parser
    accepted_prediction_tokens: int | None = None  # with --speculative-config: drafts accepted
    rejected_prediction_tokens: int | None = None  # ... and rejected


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None  # with --reasoning-parser / speculation


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # with --reasoning-parser
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str


ERRORS = {
    400: "the request is wrong as sent: bad JSON, an unknown, missing or mistyped field (named in `param`), a "
         "value out of range or over a server limit, a body over --max-frame-bytes",
    401: "a missing or wrong API key (--api-key)",
    404: "a model id this server does not serve",
    415: "a body whose Content-Type is not application/json",
    429: "busy: over --max-queued-requests or --max-tokens-in-flight; retry after Retry-After seconds",
    503: "loading, draining, or the engine failed (the server is stopping): no new requests; retry after "
         "Retry-After seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}


def generation_responses(response: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A completions route: the JSON response, or with ``"stream": true`` server-sent events of chunks."""
    ok = {"model": response, "description": "the whole response; with stream=true, server-sent events",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    return {200: ok, **error_responses(400, 401, 404, 415, 429, 503)}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads ``model`` as its JSON body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": REF.format(model=model.__name__)}}}}}


def install_openapi(app: FastAPI, bodies: list[type[BaseModel]]) -> None:
    """Serve the routes' schema with ``bodies`` (and the models they use) among its components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            models: list[type[BaseModel]] = [*bodies, ErrorBody]
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    document_client_errors(operation["responses"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_client_errors(responses: dict[str, Any]) -> None:
    """Any route may refuse a request with a 4xx in OpenAI's shape (FastAPI's own 422 for a bad parameter
    is answered as such a 400 by the error handlers): document the range where a route names no status."""
    responses.pop("422", None)
    responses.setdefault("4XX", {"description": "the request was refused; the body says why",
                                 "content": {"application/json": {"schema": {"$ref": REF.format(
                                     model="ErrorBody")}}}})
