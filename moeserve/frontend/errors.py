"""Typed front-end errors. Each has a stable ``code`` (the RPC Error frame's code), an HTTP status and an
OpenAI error ``type``; the message says what was wrong and what is allowed."""

from __future__ import annotations


class FrontendError(Exception):
    code = "internal"
    status = 500
    openai_type = "server_error"

    def __init__(self, message: str, param: str | None = None, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.request_id = request_id

    @property
    def outcome(self) -> str:
        """The ``moeserve_requests_total`` outcome of a request refused with this error. A client's mistake
        (4xx: ``bad_request``, ``unauthorized``, ``client_error`` for the others, such as 404 and 415) is
        counted apart from the server's failures (5xx: ``unavailable``, ``error``), which alone feed the
        error-rate alert (deploy/prometheus/alerts.yml); ``busy`` (429) is load, neither."""
        named = {400: "bad_request", 401: "unauthorized", 429: "busy", 503: "unavailable"}
        return named.get(self.status, "client_error" if self.status < 500 else "error")


class BadRequest(FrontendError):
    """A request that is wrong as sent: bad types, unknown or missing fields, values out of range."""

    code, status, openai_type = "bad_request", 400, "invalid_request_error"


class BadFrame(BadRequest):
    """Bytes that are not a message: malformed msgpack or JSON, non-UTF-8 text, not a map, several frames."""

    code = "bad_frame"


class FrameTooLarge(BadRequest):
    code = "frame_too_large"


class LimitExceeded(BadRequest):
    """A well-formed request past a server bound (prompt length, max_tokens, n)."""

    code = "limit_exceeded"


class UnsupportedMediaType(BadRequest):
    """An HTTP body sent with a Content-Type other than JSON."""

    code, status = "unsupported_media_type", 415


class Unauthorized(FrontendError):
    code, status, openai_type = "unauthorized", 401, "authentication_error"


class NotFound(FrontendError):
    code, status, openai_type = "not_found", 404, "invalid_request_error"


class Busy(FrontendError):
    """Too many queued requests or tokens in flight: retry later."""

    code, status, openai_type = "busy", 429, "rate_limit_error"


class Unavailable(FrontendError):
    """Loading or draining: no new requests are taken."""

    code, status, openai_type = "unavailable", 503, "server_error"


class SlowConsumer(FrontendError):
    """A stream whose reader fell behind the bounded per-request buffer; the request was aborted."""

    code, status, openai_type = "slow_consumer", 500, "server_error"


class EngineFailure(FrontendError):
    code, status, openai_type = "engine_error", 500, "server_error"


class EngineRankFailure(EngineFailure):
    """A rank of the engine died under the request (a stream ended instead of resuming, or the server stops
    after too many restarts): the request was fine, and may be sent again (503, Retry-After)."""

    status = 503


ERROR_CODES = frozenset(cls.code for cls in (FrontendError, BadRequest, BadFrame, FrameTooLarge, LimitExceeded,
                                             UnsupportedMediaType, Unauthorized, NotFound, Busy, Unavailable,
                                             SlowConsumer, EngineFailure))
