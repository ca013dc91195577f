"""Every error the server sends is JSON: `{"error": {"message", "type", "code", "param"}}` with a
4xx status for anything the client can fix, 503 when the model (or the cluster behind it) is
down. Anthropic routes get the same body plus `"type": "error"`, which is Anthropic's shape.

A 500 never carries the exception's text (it can hold paths, prompts or internals): its
traceback is logged once, where it is caught, and the client gets the request id to quote."""
from __future__ import annotations

import contextvars
import json

from fastapi.responses import JSONResponse

from k2mlx.errors import ClusterError, ContextOverflowError, K2Error, RequestError

# set per request by the guard middleware (k2mlx.server.guard); also sent as `x-request-id`
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("k2mlx_request_id", default="-")


class JSON(JSONResponse):
    """A JSON response that cannot fail to encode: a lone surrogate (only possible inside a JSON
    string) is written as its `\\udXXX` escape instead of raising UnicodeEncodeError."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


def error_body(message: str, type_: str, code: str | None, param: str | None = None, anthropic: bool = False) -> dict:
    body = {"error": {"message": message, "type": type_, "code": code, "param": param}}
    if anthropic:
        body["type"] = "error"
    return body


def internal_error() -> HTTPError:
    return HTTPError(500, f"internal server error (request id {request_id.get()}); the server log has the details",
                     type_="server_error", code="internal_error")


def to_http(exc: Exception) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return HTTPError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, RequestError):
        return HTTPError(400, str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, ClusterError):
        return HTTPError(503, str(exc), type_="service_unavailable", code="cluster_failure")
    if isinstance(exc, K2Error):
        return HTTPError(400, str(exc), code="invalid_request")
    return internal_error()


def error_response(exc: Exception, anthropic: bool = False) -> JSONResponse:
    e = to_http(exc)
    return JSON(error_body(e.message, e.type, e.code, e.param, anthropic), status_code=e.status, headers=e.headers)
