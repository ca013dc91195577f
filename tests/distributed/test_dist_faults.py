"""Faults: whatever dies, every process of the cluster is gone within 10 s, with a message
naming the rank (and host) that failed. Real rank processes on loopback, real signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from k2mlx.distributed.state import group_alive

LIMIT_S = 10.0


def kill_groups(pids) -> None:
    """Test cleanup: SIGKILL whatever of these process groups is left."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Cluster:
    """The launcher as a separate process, running a slow greedy decode on two ranks."""

    def __init__(self, ckpt, tmp_path, deadline=3.0):
        self.state = tmp_path / "state.json"
        args = {"prompts": [[5, 6, 7]], "steps": 200, "hold_s": 0.2, "out": str(tmp_path / "o.npz")}
        cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1",
               "--model", str(ckpt), "--role", "k2mlx.distributed.scenarios:greedy_logits",
               "--role-args", json.dumps(args), "--layers", "[[0, 2], [2, 4]]",
               "--deadline", str(deadline), "--state", str(self.state)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.decoding = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True).start()

    def _read(self, stream, sink):
        for line in stream:
            sink.append(line)
            if "decode step 2" in line:
                self.decoding.set()

    def pids(self) -> list[int]:
        return [r["pid"] for r in json.loads(self.state.read_text())["ranks"]]

    def wait_decoding(self):
        assert self.decoding.wait(90), "generation never started:\n" + "".join(self.out + self.err)
        assert self.proc.poll() is None

    def wait_exit(self) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=LIMIT_S + 5)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    def cleanup(self):
        kill_groups([self.proc.pid] + (self.pids() if self.state.exists() else []))


@pytest.fixture
def cluster(tiny_checkpoint, tmp_path):
    c = Cluster(tiny_checkpoint, tmp_path)
    yield c
    c.cleanup()


def assert_all_gone(pids, within=LIMIT_S):
    end = time.monotonic() + within
    while time.monotonic() < end and any(group_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if group_alive(p)]
    assert not left, f"cluster processes left behind: {left}"


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_a_rank_stops_everything(cluster, victim):
    cluster.wait_decoding()
    pids = cluster.pids()
    os.kill(pids[victim], signal.SIGKILL)
    rc, dt = cluster.wait_exit()
    err = "".join(cluster.err)
    assert rc == 3, f"launcher rc {rc}\n{err}"
    assert dt < LIMIT_S, f"launcher took {dt:.1f} s"
    assert f"rank {victim}, host 127.0.0.1" in err and "killed by signal 9" in err, err
    assert_all_gone(pids, within=1.0)


def test_frozen_rank_detected_by_heartbeat_deadline(cluster):
    """SIGSTOP keeps rank 1's sockets open (like a cut cable or a hung host): only the
    heartbeat deadline can notice. Rank 0 must name rank 1 and everything must go."""
    cluster.wait_decoding()
    pids = cluster.pids()
    os.kill(pids[1], signal.SIGSTOP)
    rc, dt = cluster.wait_exit()
    err = "".join(cluster.err)
    assert rc == 3, f"launcher rc {rc}\n{err}"
    assert dt < LIMIT_S, f"launcher took {dt:.1f} s"
    assert "[rank 1, host 127.0.0.1] no heartbeat" in err, err
    assert_all_gone(pids, within=1.0)


def test_launcher_killed_takes_ranks_with_it(cluster):
    cluster.wait_decoding()
    pids = cluster.pids()
    os.kill(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait(5)
    assert_all_gone(pids)
