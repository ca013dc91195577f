"""Heartbeats with a deadline, on a side TCP channel beside MLX's own sockets.

Why a side channel: MLX's send/recv block in C++. A peer process that dies closes its sockets and
a pending recv fails at once, but a cut cable or a powered-off Mac sends nothing, so only a
deadline notices it. Rank 0 runs a hub; every other rank keeps one connection to it. Both sides
send a line of JSON every `interval_s`; silence for `deadline_s`, a closed connection, or the
parent process going away is a failure. The hub tells every other rank which rank failed
("abort"), so all of them stop with a message naming host and rank. Threads, not processes: MLX
releases the GIL while it waits on a socket (measured), so a heartbeat thread keeps running while
the main thread is blocked in a recv.

On failure the default is to print the ClusterError, run the registered callbacks (the server
uses one to answer in-flight requests with 503) and exit the process with code 3: a rank whose
peer is gone cannot make progress, and exiting is the only way to free a thread stuck in MLX.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import resource
import select
import socket
import sys
import threading
import time
from typing import Callable

from k2mlx.errors import ClusterError

from .hosts import ClusterSpec

EXIT_CLUSTER = 3
MAX_LINE = 64 * 1024   # a heartbeat is ~200 bytes; anything near this is not one of ours
HELLO_S = 5.0          # a new connection must say hello within this (slow senders are dropped)
MAX_PENDING = 32       # connections that have not said hello yet; more are refused at once

log = logging.getLogger("k2mlx.distributed.health")


class BadMessage(ValueError):
    """A line on the heartbeat port that is not a valid message: the connection is dropped."""


def _int(v, lo: int, hi: int) -> int:
    # bool is an int in Python; `"rank": true` is not a rank
    if type(v) is not int or not lo <= v <= hi:
        raise BadMessage(f"bad rank {v!r}")
    return v


def check_hub_message(m, size: int) -> dict:
    """What a rank (or `cluster status`) may send to rank 0's hub; raises BadMessage."""
    if not isinstance(m, dict) or not isinstance(m.get("t"), str):
        raise BadMessage("not a message object")
    kind = m["t"]
    if kind == "hello":
        if not isinstance(m.get("token"), str):
            raise BadMessage("hello without a token")
        if m.get("status") is not True:
            _int(m.get("rank"), 1, size - 1)
    elif kind == "error":
        if not isinstance(m.get("msg", ""), str):
            raise BadMessage("error message is not text")
    elif kind != "hb":
        raise BadMessage(f"unknown message type {kind[:20]!r}")
    if "mem" in m and not isinstance(m["mem"], dict):
        raise BadMessage("mem is not an object")
    return m


def check_peer_message(m, size: int) -> dict:
    """What rank 0's hub may send to a rank; raises BadMessage."""
    if not isinstance(m, dict) or m.get("t") not in ("hb", "abort", "bye"):
        raise BadMessage("not a hub message")
    if m["t"] == "abort":
        _int(m.get("rank", 0), 0, size - 1)
        if not isinstance(m.get("msg", ""), str):
            raise BadMessage("abort message is not text")
    return m


def peak_rss() -> int:
    """This process's peak resident set, bytes. On Linux from VmHWM: a child started from a big
    parent inherits the parent's ru_maxrss across fork + exec, so that would report the parent's
    peak (a rank started by a test runner holding 1.6 GB said 1.6 GB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux (macOS has no /proc)
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def memory_info() -> dict:
    info = {"peak_rss": peak_rss()}
    try:
        import mlx.core as mx

        info["mlx_active"] = int(mx.get_active_memory())
        info["mlx_peak"] = int(mx.get_peak_memory())
    except Exception:  # an MLX build without the memory API
        pass
    return info


class _Conn:
    """One newline-delimited JSON connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.rank: int | None = None
        self.last = self.opened = time.monotonic()

    def send(self, msg: dict) -> bool:
        try:
            self.sock.settimeout(1.0)  # a wedged peer must not stall the heartbeat thread
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            return True
        except OSError:
            return False

    def read(self) -> list | None:
        """Messages available now (parsed JSON, not yet validated); None when the peer closed
        the connection. Raises BadMessage on a line that is not JSON or is too long."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > MAX_LINE or any(len(line) > MAX_LINE for line in lines):
            raise BadMessage(f"line longer than {MAX_LINE} bytes")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadMessage("not JSON") from None
        self.last = time.monotonic()
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Health:
    """Start with `Health(spec, rank).start()`; rank 0 then calls `wait_ready()`."""

    def __init__(self, spec: ClusterSpec, rank: int, exit_on_failure: bool = True):
        self.spec, self.rank = spec, rank
        self.exit_on_failure = exit_on_failure
        self.error: ClusterError | None = None
        self.failed = threading.Event()
        self.ready = threading.Event()
        self.stopping = False
        self.peers: dict[int, _Conn] = {}
        self.status: dict[int, dict] = {}
        self.callbacks: list[Callable[[ClusterError], None]] = []
        self.info: dict = {}  # extra fields this rank reports (e.g. the endpoint URL)
        self._ppid = os.getppid()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._dropped, self._drop_logged = 0, -1e9  # hostile connections dropped, last warning

    # ---- public -------------------------------------------------------------------------
    def start(self) -> "Health":
        target = self._hub if self.rank == 0 else self._peer
        if self.rank == 0:
            host, port = self.spec.heartbeat.rsplit(":", 1)
            self._listener = socket.create_server((host, int(port)), reuse_port=False)
            self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._guarded, args=(target,), name="k2mlx-health",
                                        daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every rank has connected (rank 0) or the hub answered (others)."""
        end = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            self.raise_if_failed()
            if time.monotonic() > end:
                missing = [r for r in range(1, self.spec.size) if r not in self.peers]
                r = missing[0] if missing else 0
                self.fail(f"did not connect within {timeout:.0f} s", r)
        self.raise_if_failed()

    def on_failure(self, fn: Callable[[ClusterError], None]) -> None:
        self.callbacks.append(fn)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Orderly end: tell the peers this is not a failure, then close."""
        self.stopping = True
        with self._lock:
            for c in self.peers.values():
                c.send({"t": "bye"})
                c.close()

    def fail(self, message: str, rank: int, exit_now: bool | None = None) -> ClusterError:
        with self._lock:
            if self.error is not None:
                return self.error
            host = str(self.spec.host(rank)) if 0 <= rank < self.spec.size else None
            self.error = ClusterError(message, host=host, rank=rank)
            self.failed.set()
            if self.rank == 0:  # tell everyone else which rank failed
                for r, c in self.peers.items():
                    if r != rank:
                        c.send({"t": "abort", "rank": rank, "msg": message})
        err = self.error
        print(f"k2mlx: cluster error on rank {self.rank}: {err}", file=sys.stderr, flush=True)
        report_to_launcher(err, self.rank)
        for fn in self.callbacks:
            try:
                fn(err)
            except Exception:  # a callback must not keep the process alive
                log.exception("a cluster-failure callback raised")
        if self.exit_on_failure if exit_now is None else exit_now:
            sys.stderr.flush()
            os._exit(EXIT_CLUSTER)
        return err

    def snapshot(self) -> dict:
        """What `cluster status` shows: per rank host, layers, memory, heartbeat age."""
        now = time.monotonic()
        ranks = []
        for r in range(self.spec.size):
            entry = {"rank": r, "host": str(self.spec.host(r)), "layers": self.spec.layers[r]}
            if r == 0:
                entry.update(memory=memory_info(), health="ok" if not self.error else "failed")
            else:
                c = self.peers.get(r)
                st = self.status.get(r, {})
                entry["memory"] = st.get("mem", {})
                if c is None:
                    entry["health"] = "not connected"
                else:
                    age = now - c.last
                    entry["heartbeat_age_s"] = round(age, 2)
                    entry["health"] = "ok" if age < self.spec.deadline_s else "late"
            ranks.append(entry)
        return {"ranks": ranks, "parallel": getattr(self.spec, "parallel", "pipeline"),
                "error": str(self.error) if self.error else None, **self.info}

    # ---- threads ------------------------------------------------------------------------
    def _parent_gone(self) -> bool:
        # The launcher is our parent; if it dies we are re-parented (macOS has no PDEATHSIG).
        return os.getppid() != self._ppid

    def _guarded(self, body: Callable[[], None]) -> None:
        """The health thread's own death is a cluster failure: without it a dead peer would go
        unnoticed, so it must not end quietly."""
        try:
            body()
        except BaseException as e:  # noqa: BLE001  (the thread ends either way: say why)
            if self.stopping or self.error is not None:  # an orderly stop closed our sockets
                return
            log.exception("health monitor of rank %d crashed", self.rank)
            self.fail(f"the health monitor crashed ({type(e).__name__}: {e})", self.rank)

    def _drop(self, conn: _Conn, pending: list[_Conn], why: str) -> None:
        # one warning per 10 s at most (a flood must not flood the log), the count with it
        now = time.monotonic()
        self._dropped += 1
        if now >= self._drop_logged + 10.0:
            log.warning("heartbeat port: dropped a connection from %s: %s (%d dropped since the last "
                        "warning)", _peer_name(conn), why, self._dropped)
            self._drop_logged, self._dropped = now, 0
        if conn in pending:
            pending.remove(conn)
        conn.close()

    def _hub(self) -> None:
        pending: list[_Conn] = []
        interval, deadline = self.spec.interval_s, self.spec.deadline_s
        next_beat = 0.0
        while not self.stopping and self.error is None:
            socks = [self._listener] + [c.sock for c in pending] + [c.sock for c in self.peers.values()]
            readable, _, _ = select.select(socks, [], [], interval / 2)
            for s in readable:
                if s is self._listener:
                    try:
                        sock, _ = self._listener.accept()
                    except OSError:
                        continue
                    sock.setblocking(False)
                    conn = _Conn(sock)
                    if len(pending) >= MAX_PENDING:  # a flood must not starve the real ranks
                        self._drop(conn, pending, "too many connections without a hello")
                    else:
                        pending.append(conn)
                    continue
                conn = next((c for c in pending + list(self.peers.values()) if c.sock is s), None)
                if conn is None:
                    continue
                try:
                    msgs = conn.read()
                    if msgs is not None:
                        msgs = [check_hub_message(m, self.spec.size) for m in msgs]
                except BadMessage as e:
                    if conn in pending:
                        self._drop(conn, pending, str(e))
                    elif not self.stopping:
                        self.fail(f"sent a malformed heartbeat message ({e})", conn.rank)
                    continue
                if msgs is None:
                    if conn in pending:
                        pending.remove(conn)
                        conn.close()
                    elif not self.stopping:
                        self.fail("connection closed (the process died or its host went away)", conn.rank)
                    continue
                for m in msgs:
                    if conn.sock.fileno() < 0:  # dropped by an earlier message of this batch
                        break
                    self._hub_message(conn, m, pending)
            now = time.monotonic()
            for c in [c for c in pending if now - c.opened > HELLO_S]:
                self._drop(c, pending, f"no hello within {HELLO_S:.0f} s")
            if now >= next_beat:
                next_beat = now + interval
                for r, c in list(self.peers.items()):
                    if not c.send({"t": "hb"}) and not self.stopping:
                        self.fail("heartbeat could not be sent (link down)", r)
            for r, c in list(self.peers.items()):
                if now - c.last > deadline and not self.stopping:
                    self.fail(f"no heartbeat for {now - c.last:.1f} s (link down or host frozen)", r)
            if self._parent_gone():
                self.fail("the launcher exited", 0)

    def _hub_message(self, conn: _Conn, m: dict, pending: list[_Conn]) -> None:
        kind = m["t"]
        if kind == "hello":
            if conn not in pending:  # a rank says hello once
                return
            if not hmac.compare_digest(m["token"].encode(), self.spec.token.encode()):
                self._drop(conn, pending, "wrong token")
                return
            if m.get("status") is True:  # `cluster status` asking, not a rank
                conn.send({"t": "status", **self.snapshot()})
                pending.remove(conn)
                conn.close()
                return
            r = m["rank"]
            if r in self.peers:
                self._drop(conn, pending, f"rank {r} is already connected")
                return
            conn.rank = r
            pending.remove(conn)
            with self._lock:
                self.peers[r] = conn
                self.status[r] = m
            if len(self.peers) == self.spec.size - 1:
                self.ready.set()
        elif conn.rank is None:  # anything before a valid hello
            self._drop(conn, pending, f"{kind!r} before hello")
        elif kind == "hb":
            self.status[conn.rank] = m
        elif kind == "error":
            self.fail(m.get("msg") or "failed", conn.rank)

    def _peer(self) -> None:
        host, port = self.spec.heartbeat.rsplit(":", 1)
        interval, deadline = self.spec.interval_s, self.spec.deadline_s
        end = time.monotonic() + 120.0
        sock = None
        while sock is None:
            try:
                sock = socket.create_connection((host, int(port)), timeout=2.0)
            except OSError:
                if time.monotonic() > end or self._parent_gone():
                    self.fail("cannot reach the health hub of rank 0", 0)
                    return
                time.sleep(0.2)
        conn = _Conn(sock)
        self.peers[0] = conn
        conn.send({"t": "hello", "rank": self.rank, "token": self.spec.token, "mem": memory_info()})
        sock.setblocking(False)
        self.ready.set()
        next_beat = 0.0
        while self.error is None:
            readable, _, _ = select.select([sock], [], [], interval / 2)
            if readable:
                try:
                    msgs = conn.read()
                    if msgs is not None:
                        msgs = [check_peer_message(m, self.spec.size) for m in msgs]
                except BadMessage as e:
                    self.fail(f"rank 0's hub sent a malformed message ({e})", 0)
                    return
                if msgs is None:
                    if self.stopping:
                        return
                    self.fail("connection to rank 0 closed (rank 0 died or its host went away)", 0)
                    return
                for m in msgs:
                    if m["t"] == "abort":
                        self.fail(m.get("msg") or "failed", m.get("rank", 0))
                        return
                    if m["t"] == "bye":  # orderly shutdown from rank 0
                        self.stopping = True
                        if self.exit_on_failure:
                            os._exit(0)
                        return
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + interval
                if not conn.send({"t": "hb", "mem": memory_info()}) and not self.stopping:
                    self.fail("heartbeat could not be sent (link down)", 0)
                    return
            if now - conn.last > deadline:
                self.fail(f"no heartbeat from rank 0 for {now - conn.last:.1f} s (link down or host frozen)", 0)
                return
            if self._parent_gone():
                self.fail("this rank's launcher exited", self.rank)
                return

    def report_error(self, message: str) -> None:
        """A non-zero rank tells the hub it is failing (e.g. its model did not load)."""
        c = self.peers.get(0)
        if c is not None:
            c.send({"t": "error", "msg": message})


def _peer_name(conn: _Conn) -> str:
    try:
        return "%s:%s" % conn.sock.getpeername()[:2]
    except OSError:
        return "a closed socket"


def report_to_launcher(err: ClusterError, by_rank: int) -> None:
    """Tell the launcher which rank really failed (it only sees who exited first)."""
    info = json.dumps({"rank": err.rank, "host": err.host, "msg": str(err), "by": by_rank})
    path = os.environ.get("K2MLX_ERROR_FILE")
    try:
        if path:
            with open(path, "w") as f:
                f.write(info)
        elif os.environ.get("K2MLX_ERROR_TAG"):  # remote rank: stdout goes through ssh
            print(f"K2MLX_ERROR {info}", flush=True)
    except OSError:
        log.exception("cannot tell the launcher which rank failed")


def query_status(address: str, token: str, timeout: float = 3.0) -> dict:
    """Ask a running hub for its snapshot (used by `k2mlx cluster status`)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(json.dumps({"t": "hello", "status": True, "token": token}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < 16 * MAX_LINE:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    snap = json.loads(buf)
    if not isinstance(snap, dict) or not isinstance(snap.get("ranks"), list):
        raise ValueError("the health hub answered something that is not a status")
    return snap
