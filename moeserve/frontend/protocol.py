"""The ZeroMQ token RPC protocol (version 1): typed messages, one msgpack map per frame (docs/protocol.md).

Client -> server: ``generate``, ``abort``, ``resume``, ``ping``. Server -> client: ``token``, ``final``,
``error``, ``pong``. Decoding never unpickles and never raises anything but a ``BadRequest`` subclass:
every frame a client can send maps to a typed message or a typed error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from moeserve.frontend.errors import BadFrame, BadRequest, FrameTooLarge

PROTOCOL_VERSION = 1
RETURN_FIELDS = ("logprobs", "token_ids", "timings", "expert_trace", "reasoning")
MAX_REQUEST_ID_CHARS = 128
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REQUEST_ID_CHARS,
                                             pattern=r"^[\x21-\x7e]+$")]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    v: Literal[1] = 1
    api_key: str | None = None


class Generate(_Message):
    """Start a request. Exactly one of ``prompt`` (text) and ``token_ids``. ``params`` are SamplingParams
    fields. ``stream`` false: one ``final`` carrying the whole output. ``resumable``: a client that
    reconnects may ``resume`` the stream (otherwise losing the connection aborts the request)."""

    type: Literal["generate"]
    request_id: RequestId
    prompt: str | None = None
    token_ids: list[TokenId] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = True
    return_fields: list[Literal["logprobs", "token_ids", "timings", "expert_trace", "reasoning"]] = Field(
        default_factory=list, alias="return", max_length=len(RETURN_FIELDS))
    resumable: bool = False


class Abort(_Message):
    type: Literal["abort"]
    request_id: RequestId


class Resume(_Message):
    """Re-attach this connection to a resumable request and replay every frame after ``last_seq``."""

    type: Literal["resume"]
    request_id: RequestId
    last_seq: int = Field(ge=-1, lt=2**31)


class Ping(_Message):
    type: Literal["ping"]
    nonce: int | str | None = None


ClientMessage = Generate | Abort | Resume | Ping
_MODELS: dict[str, type[_Message]] = {"generate": Generate, "abort": Abort, "resume": Resume, "ping": Ping}


def _unpack(frame: bytes, max_frame_bytes: int) -> Any:
    if len(frame) > max_frame_bytes:
        raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the limit of {max_frame_bytes} bytes")
    try:
        # NOTE: raw=False rejects non-UTF-8 strings; strict_map_key keeps map keys to str/bytes
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except UnicodeDecodeError as e:
        raise BadFrame(f"text is not valid UTF-8: {e.reason}") from e
    except Exception as e:  # noqa: BLE001 - msgpack raises many types (ExtraData, StackError, TypeError, ...)
        raise BadFrame(f"malformed msgpack frame: {type(e).__name__}: {e}") from e


def request_id_of(body: Any) -> str | None:
    """The request id of a (possibly invalid) message, when it has a usable one: errors then name it."""
    rid = body.get("request_id") if isinstance(body, dict) else None
    if isinstance(rid, str) and 0 < len(rid) <= MAX_REQUEST_ID_CHARS:
        return rid
    return None


def validation_message(e: ValidationError, body: Any = None) -> tuple[str, str | None]:
    """(message, param) in plain words from pydantic's errors about ``body``: the most specific one, its
    location spelled as the client's fields (without the names pydantic gives the members of a union,
    ``prompt.str``), and the alternatives a union would have taken ("a valid string or a valid list")."""
    errors = e.errors()
    paths = [field_path(err["loc"], body, err["type"] == "missing") for err in errors]
    path = max(paths, key=len)
    same = [err for p, err in zip(paths, errors) if p == path]
    loc = ".".join(str(p) for p in path)
    err = same[0]
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown field {loc!r}", loc
    if kind == "missing":
        return f"missing field {loc!r}", loc
    reasons = dict.fromkeys(str(x["ctx"]["error"]) if x["type"] == "value_error" else x["msg"] for x in same)
    return f"field {loc!r}: {' or '.join(reasons)}", loc or None


def field_path(loc: tuple[Any, ...], body: Any, missing: bool = False) -> tuple[Any, ...]:
    """The parts of a pydantic error location that are keys or indexes of ``body`` (a missing field: also
    its name); the others name union members. Without a body the location is kept as it is."""
    if body is None:
        return tuple(loc)
    path: list[Any] = []
    node = body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1 and isinstance(node, dict)):
            continue
        path.append(part)
    return tuple(path)


def decode_client_message(frame: bytes, max_frame_bytes: int) -> ClientMessage:
    """Bytes -> a validated client message. Raises BadRequest (or a subclass) for anything else; the error
    carries ``request_id`` when the frame named a usable one."""
    body = _unpack(frame, max_frame_bytes)
    if not isinstance(body, dict):
        raise BadFrame(f"a message is a msgpack map, got {type(body).__name__}")
    rid = request_id_of(body)
    kind = body.get("type")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise BadRequest(f"unknown message type {kind!r}: expected one of {sorted(_MODELS)}", "type", rid)
    try:
        msg = model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e, body)
        raise BadRequest(f"{kind}: {message}", param, rid) from None
    if isinstance(msg, Generate) and (msg.prompt is None) == (msg.token_ids is None):
        raise BadRequest("generate: give exactly one of 'prompt' and 'token_ids'", "prompt", rid)
    return msg  # type: ignore[return-value]


# ---- server -> client frames (plain maps; keys are always strings) ----

def pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def token_frame(request_id: str, seq: int, token_ids: list[int], text_delta: str,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"v": PROTOCOL_VERSION, "type": "token", "request_id": request_id, "seq": seq,
            "token_ids": token_ids, "text_delta": text_delta}
    if extra:
        body.update(extra)
    return body


def final_frame(request_id: str, seq: int, finish_reason: str | None, usage: dict[str, int],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"v": PROTOCOL_VERSION, "type": "final", "request_id": request_id, "seq": seq,
            "finish_reason": finish_reason, "usage": usage}
    if extra:
        body.update(extra)
    return body


def error_frame(code: str, message: str, request_id: str | None = None, seq: int | None = None
                ) -> dict[str, Any]:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "error", "request_id": request_id, "code": code,
                            "message": message}
    if seq is not None:
        body["seq"] = seq
    return body


def pong_frame(nonce: int | str | None, ready: bool) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": "pong", "nonce": nonce, "ready": ready}


def decode_server_frame(frame: bytes) -> dict[str, Any]:
    """Client side: a server frame -> its map (raises BadFrame for anything that is not one)."""
    body = _unpack(frame, 1 << 30)
    if not isinstance(body, dict) or body.get("type") not in ("token", "final", "error", "pong"):
        raise BadFrame("not a server message")
    return body
