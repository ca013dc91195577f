"""Issue 13's cluster items, each against the real code path: which hosts count as local, hostile
lines on the heartbeat port, the health thread's own death, where the doorbells run, ring files
left in the temp dir, and per-cluster state files."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from k2mlx.distributed import state as cstate
from k2mlx.distributed.health import Health
from k2mlx.distributed.hosts import ClusterSpec, parse_host, parse_hosts, use_doorbells
from k2mlx.distributed.launch import Launcher, make_spec
from k2mlx.errors import ClusterError, ConfigError


# ---- local hosts -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,local", [("127.0.0.1", True), ("localhost", True),
                                        ("user@127.0.0.1:2222", False), ("user@127.0.0.1", False),
                                        ("127.0.0.1:2222", False)])
def test_host_is_local_only_without_user_or_port(text, local):
    assert parse_host(text).is_local is local


@pytest.mark.parametrize("bad", ["@127.0.0.1", "u@", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x"])
def test_malformed_hosts_are_one_line_errors(bad):
    with pytest.raises(ConfigError):
        parse_host(bad)


def test_user_and_port_on_loopback_go_through_ssh(tmp_path):
    """`user@127.0.0.1:2222` is started over ssh with that user and port (a fake `ssh` on PATH
    records its argv), not as a local process with both dropped."""
    record = tmp_path / "ssh-argv.json"
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                    "sys.exit(255)\n")
    fake.chmod(0o755)
    hosts = parse_hosts("127.0.0.1,alice@127.0.0.1:2222")
    spec = make_spec(hosts, "unused", "unused:role", layers=[[0, 1], [1, 2]])
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{fake.parent}{os.pathsep}{old}"
    launcher = Launcher(spec, python="/bin/true", rank0_inherit=False, log=open(os.devnull, "w"))
    try:
        launcher.start()
        launcher.procs[1].popen.wait(10)
    finally:
        os.environ["PATH"] = old
        launcher.stop()
    argv = json.loads(record.read_text())
    assert argv[argv.index("-p") + 1] == "2222" and "alice@127.0.0.1" in argv


# ---- heartbeat port ----------------------------------------------------------------------------
def _spec(size=2, deadline=2.0) -> ClusterSpec:
    hosts = parse_hosts(",".join(["127.0.0.1"] * size))
    return make_spec(hosts, None, "none:none", layers=[[0, 1]] * size, deadline_s=deadline)


class FakeRank:
    """Rank 1's side of the heartbeat protocol, spoken by hand over a real socket."""

    def __init__(self, spec):
        host, port = spec.heartbeat.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(json.dumps({"t": "hello", "rank": 1, "token": spec.token}).encode() + b"\n")
        self.alive = True
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self):
        while self.alive:
            try:
                self.sock.sendall(b'{"t": "hb"}\n')
            except OSError:
                return
            time.sleep(0.2)

    def die(self):
        self.alive = False
        self.sock.close()


@pytest.fixture
def hub():
    spec = _spec()
    h = Health(spec, 0, exit_on_failure=False).start()
    peer = FakeRank(spec)
    h.wait_ready(10)
    yield h, peer
    peer.die()
    h.stop()


def _closed_by_hub(sock, within=8.0) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


HOSTILE = [b"5\n", b"null\n", b"[1, 2]\n", b"\xff\xfe garbage\n", b'{"t": "hb"}\n',
           b'{"t": "hello", "token": "TOKEN"}\n',                    # a hello without a rank
           b'{"t": "hello", "token": "TOKEN", "rank": "1"}\n',
           b'{"t": "hello", "token": "TOKEN", "rank": true}\n',
           b'{"t": "hello", "token": "TOKEN", "rank": 7}\n',
           b'{"t": "hello", "token": "TOKEN", "rank": 1}\n',         # rank 1 is already connected
           b'{"t": "hello", "token": 5, "rank": 1}\n',
           b'{"t": "hello", "token": "wrong", "rank": 1}\n',
           b'{"t": "error", "msg": "forged"}\n',                     # before any hello
           b'{"t": "nonsense"}\n']


def test_hostile_lines_are_dropped_and_failure_detection_survives(hub):
    h, peer = hub
    host, port = h.spec.heartbeat.rsplit(":", 1)
    for line in HOSTILE + [b"x" * (200 * 1024)]:  # the last: a huge line without a newline
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(line.replace(b"TOKEN", h.spec.token.encode()))
            assert _closed_by_hub(s), f"hub kept the connection after {line[:60]!r}"
        assert h._thread.is_alive() and h.error is None, f"{line[:60]!r} broke the hub: {h.error}"
    # a slow sender (one byte, then silence) is dropped after the hello timeout
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"{")
        assert _closed_by_hub(s, within=10.0), "a silent half-hello held its connection"
    assert h.snapshot()["ranks"][1]["health"] == "ok"
    peer.die()  # and a dead peer is still noticed
    assert h.failed.wait(5), "rank 1's death went unnoticed"
    assert h.error.rank == 1


def test_a_connection_flood_does_not_starve_the_ranks(hub):
    h, _ = hub
    host, port = h.spec.heartbeat.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(200)]
    try:
        time.sleep(h.spec.deadline_s + 0.5)  # longer than the deadline: heartbeats still read
        assert h.error is None and h._thread.is_alive()
    finally:
        for s in socks:
            s.close()


def test_health_thread_death_is_a_cluster_failure(hub):
    h, _ = hub
    h.info["unserialisable"] = object()  # the next status answer raises inside the thread
    host, port = h.spec.heartbeat.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(json.dumps({"t": "hello", "status": True, "token": h.spec.token}).encode() + b"\n")
        assert h.failed.wait(5), "the health thread died without failing the cluster"
    assert "health monitor crashed" in str(h.error)


def test_peer_drops_a_malformed_hub_message():
    spec = _spec()
    host, port = spec.heartbeat.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    peer = Health(spec, 1, exit_on_failure=False).start()
    try:
        conn, _ = srv.accept()
        conn.sendall(b'{"t": "abort", "rank": "everyone"}\n')
        assert peer.failed.wait(5)
        assert "malformed" in str(peer.error) and peer.error.rank == 0
    finally:
        srv.close()


# ---- doorbells ---------------------------------------------------------------------------------
def test_doorbells_only_for_ranks_sharing_a_host(monkeypatch):
    monkeypatch.delenv("K2MLX_DOORBELL", raising=False)
    same = parse_hosts("127.0.0.1,127.0.0.1")
    apart = parse_hosts("127.0.0.1,127.0.0.2")
    assert use_doorbells(same, "ring") and not use_doorbells(apart, "ring")
    assert not use_doorbells(same, "jaccl")
    assert make_spec(same, None, "r:r", layers=[[0, 1], [1, 2]]).bell_ports
    assert make_spec(apart, None, "r:r", layers=[[0, 1], [1, 2]]).bell_ports is None
    assert make_spec(same, None, "r:r", layers=[[0, 1], [1, 2]], backend="jaccl").bell_ports is None
    monkeypatch.setenv("K2MLX_DOORBELL", "0")
    assert make_spec(same, None, "r:r", layers=[[0, 1], [1, 2]]).bell_ports is None


# ---- ring files --------------------------------------------------------------------------------
def test_private_files_are_exclusive_and_0600(tmp_path, monkeypatch):
    from k2mlx.distributed.rank import _private_file

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    a, b = _private_file("k2mlx-ring-", "[]"), _private_file("k2mlx-ring-", "[]")
    assert a != b and stat.S_IMODE(os.stat(a).st_mode) == 0o600


def test_ring_files_are_removed(tiny_checkpoint, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = {"prompts": [[5, 6, 7]], "steps": 1, "out": str(tmp_path / "o.npz")}
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1",
           "--model", str(tiny_checkpoint), "--role", "k2mlx.distributed.scenarios:greedy_logits",
           "--role-args", json.dumps(args), "--layers", "[[0, 2], [2, 4]]"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o.npz").exists()
    left = [n for n in os.listdir(tmp) if n.startswith("k2mlx-")]  # (MLX keeps its own "mlx" cache)
    assert left == [], "left in the temp dir"


# ---- per-cluster state -------------------------------------------------------------------------
def test_state_claim_is_exclusive_per_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("K2MLX_STATE_DIR", str(tmp_path))
    key = cstate.cluster_key(["127.0.0.1", "127.0.0.1"], 8000)
    path = cstate.claim(key, {"launcher_pid": os.getpid(), "addresses": ["127.0.0.1"] * 2,
                              "http_port": 8000, "url": "http://127.0.0.1:8000/v1"})
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
    with pytest.raises(ClusterError, match="already running"):
        cstate.claim(key, {"launcher_pid": os.getpid()})
    other = cstate.claim(cstate.cluster_key(["127.0.0.1", "127.0.0.1"], 8001), {"launcher_pid": os.getpid()})
    assert other != path and path.exists()  # a second cluster never touches the first's file
    assert [p for p, _ in cstate.find(port=8000)] == [path]
    dead = subprocess.Popen(["true"])
    dead.wait()
    cstate.write(path, {"launcher_pid": dead.pid, "ranks": []})  # launcher gone: stale
    again = cstate.claim(key, {"launcher_pid": os.getpid()})
    assert again == path and cstate.read(path)["launcher_pid"] == os.getpid()
