"""The HTTP layer's limits: uvicorn's h11 protocol with the deadlines it lacks.

uvicorn bounds nothing until a first response: a client that connects and sends nothing, sends
its headers a byte at a time, or sends a body shorter than its Content-Length holds a
connection (and a file descriptor) forever; about 2,100 such connections exhausted the
descriptors and every new request then hung. Here every connection has, at any moment, one
deadline:
- `header_timeout` to deliver a request's headers, from the connection's start or the end of
  the previous response (uvicorn's own keep-alive timer stops at the first byte of a request);
- `body_timeout` to deliver the whole body once the headers are in;
- `keep_alive` of silence between requests (uvicorn's timer);
- `write_timeout` for a client that stops reading what the server sends (a stream's output
  fills the socket and then the transport's buffer): the connection is dropped, which cancels
  the request and frees its batch slot.
A missed read deadline ends in a 408 JSON reply (when no response has started) and a closed
connection. At most `max_connections` are open: at the cap a new connection closes the one
that has been idle longest (waiting for a request), so idle or slow clients cannot lock out
real ones; only when every connection is busy is the new one refused. Overload and bad-request
warnings are logged at most once per interval, with a count of those suppressed.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("k2mlx.server.http")
LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    write_timeout: float = 60.0
    max_connections: int = 512
    max_header_bytes: int = 16 << 10


def _json_reply(status: int, reason: str, message: str, code: str) -> bytes:
    body = ('{"error":{"message":"%s","type":"invalid_request_error","code":"%s","param":null}}'
            % (message, code)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


_TIMEOUT_REPLY = _json_reply(408, "Request Timeout", "the request was not received in time", "request_timeout")
_HEADERS_REPLY = _json_reply(431, "Request Header Fields Too Large", "the request line and headers are over the "
                             "size limit", "headers_too_large")
_BAD_REPLY = _json_reply(400, "Bad Request", "malformed HTTP request (or headers over the size limit)",
                         "bad_http_request")


class OncePerInterval(logging.Filter):
    """Passes each distinct message template at most once per `interval` seconds."""

    def __init__(self, interval: float = LOG_INTERVAL_S):
        super().__init__()
        self.interval = interval
        self.last: dict[str, tuple[float, int]] = {}  # template -> (time passed, suppressed since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        t, n = self.last.get(key, (-1e18, 0))
        if now - t < self.interval:
            self.last[key] = (t, n + 1)
            return False
        if len(self.last) > 1000:  # templates are few; this only bounds a pathological logger
            self.last.clear()
        self.last[key] = (now, 0)
        if n:
            record.msg = f"{record.msg} ({n} more like this in the last {self.interval:.0f} s)"
        return True


def protocol_class(limits: Limits) -> type:
    class Protocol(_LimitedH11):
        pass

    Protocol.limits = limits
    return Protocol


class _LimitedH11(H11Protocol):
    limits: Limits = Limits()

    def connection_made(self, transport) -> None:
        self._timer, self._head_bytes, self._write_timer = None, 0, None
        self._watched = None  # the request cycle the current deadline is about
        self._idle_since = time.monotonic()
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            log.warning("connection limit (%d) reached with every connection busy; refusing new ones",
                        self.limits.max_connections)
            self.transport.close()
            return
        self._arm(self.limits.header_timeout)

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete and self.cycle is self._watched

    def _make_room(self) -> bool:
        idle = [c for c in self.connections if c is not self and isinstance(c, _LimitedH11) and c._idle()
                and not c.transport.is_closing()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)
        log.warning("connection limit (%d) reached; closing the longest-idle connections",
                    self.limits.max_connections)
        victim._disarm()
        victim.transport.close()
        return True

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:  # no reply half-sent
            self.transport.write(_TIMEOUT_REPLY)
        log.warning("closing a connection that did not deliver its request in time")
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        # h11 bounds only a head that arrives in pieces; one that comes in a single read of any
        # size would pass, so the head's size is counted here, before h11 sees it
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            end = data.find(b"\r\n\r\n")
            self._head_bytes += (len(data) if end < 0 else end)
            if self._head_bytes > self.limits.max_header_bytes:
                log.warning("closing a connection whose request headers are over %d bytes",
                            self.limits.max_header_bytes)
                self.transport.write(_HEADERS_REPLY)
                self.transport.close()
                return
            if end >= 0:
                self._head_bytes = 0
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if cycle is not self._watched:  # a new request's headers arrived
            self._watched = cycle
            if cycle.more_body:
                self._arm(self.limits.body_timeout)
            else:
                self._disarm()
        elif not cycle.more_body and self._timer is not None and not cycle.response_complete:
            self._disarm()  # its body is complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is self._watched and self.cycle.response_complete:
            self._idle_since = time.monotonic()
            # the next request's headers: uvicorn's keep-alive timer covers the silence before
            # its first byte, this deadline the trickle after it
            self._arm(self.limits.header_timeout + self.limits.keep_alive)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _stalled(self) -> None:
        self._write_timer = None
        log.warning("dropping a connection whose client stopped reading for %.0f s", self.limits.write_timeout)
        self.transport.abort()  # close() would wait to flush a buffer nobody reads

    def send_400_response(self, msg: str) -> None:  # uvicorn's is text/plain
        if not self.transport.is_closing():
            self.transport.write(_BAD_REPLY)
            self.transport.close()


def raise_fd_limit(want: int = 4096) -> int:
    """Lift the soft descriptor limit towards `want` (macOS starts at 256); the resulting limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.info("cannot raise the open-file limit from %d: %s", soft, e)
    return soft


def serve(app, host: str, port: int, limits: Limits, log_level: str = "warning") -> None:
    """Run `app` under uvicorn with these limits until interrupted."""
    import uvicorn

    fds = raise_fd_limit()
    if fds != resource.RLIM_INFINITY and limits.max_connections > fds - 128:
        cap = max(8, fds - 128)  # the model's files, the log and the listener need descriptors too
        log.warning("open-file limit %d: serving at most %d connections", fds, cap)
        limits = Limits(**{**limits.__dict__, "max_connections": cap})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2,
                            timeout_keep_alive=limits.keep_alive, http=protocol_class(limits),
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    once = OncePerInterval()
    for name in ("uvicorn.error", "asyncio", log.name):  # after Config: it (re)configures logging
        logging.getLogger(name).addFilter(once)
    uvicorn.Server(config).run()
