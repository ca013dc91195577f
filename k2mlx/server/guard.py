"""The outermost layer of the app (a plain ASGI middleware, so streaming bodies and client
disconnects pass through untouched). Per request it:

- gives the request an id, sent back as `x-request-id` and quoted in 500 bodies;
- refuses, before any route runs, a foreign `Host` on a server without an API key (DNS
  rebinding: a web page whose name resolves to 127.0.0.1 would otherwise drive the model) and
  any `Origin` that is not allowed (a cross-origin `text/plain` POST needs no preflight, so CORS
  alone does not stop a web page); answers CORS preflights for the allowed origins;
- counts the response by route template and status for /metrics (never by raw path);
- turns an exception that escaped a handler into a generic 500, logging its traceback once.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect
from starlette.routing import Match

from k2mlx.server.errors import JSON, error_body, internal_error, request_id

log = logging.getLogger("k2mlx.server")
UNMATCHED = "unmatched"  # the one /metrics label of every path no route serves
_TOKEN = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_CORS_HEADERS = b"authorization, content-type, x-api-key, anthropic-version, anthropic-beta, x-request-id"


def is_loopback_name(host: str) -> bool:
    """`localhost`, `*.localhost` (browsers resolve these themselves, RFC 6761), 127.0.0.0/8, ::1."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name part of a Host header (`[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`)."""
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def normalize_origin(origin: str) -> str:
    """`HTTP://Example.com:80/` -> `http://example.com`: how browsers send it and how we compare."""
    if origin in ("*", "null"):
        return origin
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme) or not parts.hostname or port == -1:
        raise ValueError(f"not an origin (scheme://host[:port], e.g. https://chat.example): {origin!r}")
    default = {"http": 80, "https": 443}.get(parts.scheme)  # apps use their own (app://obsidian.md)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class Guard:
    def __init__(self, app, *, routes, counters, api_key: str | None, allow_origins=()):
        self.app, self.routes, self.counters = app, routes, counters
        self.check_host = not api_key
        self.origins = {normalize_origin(o) for o in allow_origins}

    def route_of(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path exists under another method (405)
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED

    def origin_allowed(self, origin: str) -> bool:
        if "*" in self.origins:
            return True
        try:
            origin = normalize_origin(origin)
        except ValueError:
            return False
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and is_loopback_name(parts.hostname or "")

    def refusal(self, host: str | None, origin: str | None) -> tuple[int, str, str] | None:
        if self.check_host and host is not None and not is_loopback_name(host_name(host)):
            return (403, f"Host {host[:100]!r} is not this machine: without an API key the server answers only "
                         "loopback names (localhost, 127.0.0.1, ::1); start it with --api-key to serve other names",
                    "forbidden_host")
        if origin is not None and not self.origin_allowed(origin):
            return (403, f"Origin {origin[:100]!r} is not allowed; start the server with --allow-origin ORIGIN "
                         "to let that web page use it", "forbidden_origin")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        headers = {}
        for k, v in scope.get("headers") or ():
            headers.setdefault(k, v.decode("latin-1"))
        origin = headers.get(b"origin")
        extra = [(b"x-request-id", rid.encode())]
        if origin is not None and self.origin_allowed(origin):
            extra += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                      (b"access-control-expose-headers", b"x-request-id")]
        started = False
        route = self.route_of(scope)

        async def send_(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
                self.counters.note(route, message["status"])
            await send(message)

        anthropic = scope.get("path", "").startswith("/v1/messages")
        try:
            refused = self.refusal(headers.get(b"host"), origin)
            if refused is not None:
                status, message, code = refused
                return await JSON(error_body(message, "permission_error", code, anthropic=anthropic),
                                  status_code=status)(scope, receive, send_)
            if scope["method"] == "OPTIONS" and origin is not None and b"access-control-request-method" in headers:
                asked = headers.get(b"access-control-request-headers", "").encode("latin-1")
                names = [h.strip() for h in asked.split(b",") if h.strip()]
                allow = b", ".join(names) if names and all(_TOKEN.match(h) for h in names) else _CORS_HEADERS
                await send_({"type": "http.response.start", "status": 204, "headers": [
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", allow[:1000]), (b"access-control-max-age", b"600")]})
                return await send_({"type": "http.response.body", "body": b""})
            await self.app(scope, receive, send_)
        except ClientDisconnect:
            log.info("request %s: the client went away before sending its whole body", rid)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path", "")[:200])
            if not started:  # else the response is cut short: the connection closes, which the client sees
                e = internal_error()
                await JSON(error_body(e.message, e.type, e.code, anthropic=anthropic), status_code=500)(
                    scope, receive, send_)
        finally:
            request_id.reset(token)
