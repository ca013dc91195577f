"""The user-facing commands over two loopback ranks: `k2mlx generate --hosts` prints what the
single process prints; `k2mlx cluster up/status/down` serves, reports and stops; losing a rank
under the server ends everything within 10 s."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from k2mlx.distributed import state as cstate
from test_dist_faults import LIMIT_S, assert_all_gone, kill_groups


def k2(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "k2mlx.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("parallel", ["pipeline", "tensor"])
def test_generate_hosts_prints_same_text_as_single_process(tiny_checkpoint, tmp_path, parallel):
    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path)}
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt", "Tell me about rivers",
              "--temp", "0", "--max-tokens", "24"]
    single = k2(*common, env=env)
    assert single.returncode == 0, single.stderr
    pp = k2(*common, "--hosts", "127.0.0.1,127.0.0.1", "--parallel", parallel, env=env)
    assert pp.returncode == 0, pp.stderr
    assert len(single.stdout.strip()) > 0
    assert pp.stdout == single.stdout


def test_cluster_up_status_down_and_rank_loss(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("K2MLX_STATE_DIR", str(tmp_path))
    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path)}
    port = 18000 + os.getpid() % 1000
    up = k2("cluster", "up", "--hosts", "127.0.0.1,127.0.0.1", "--model", str(tiny_checkpoint),
            "--port", str(port), "--wait", "120", env=env)
    try:
        assert up.returncode == 0, up.stderr
        url = up.stdout.strip()
        assert url == f"http://127.0.0.1:{port}/v1"
        st = k2("cluster", "status", env=env)
        assert st.returncode == 0 and "ok" in st.stdout and "2..3" in st.stdout, st.stdout
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]

        [(_, state)] = cstate.running()
        pids = [x["pid"] for x in state["ranks"]]
        launcher = state["launcher_pid"]
        # a long streaming request in flight when rank 1 dies must end, not hang
        long = {**body, "max_tokens": 4000, "stream": True,
                "logit_bias": {str(t): -100 for t in tiny_tokenizer.eos_token_ids}}
        ended = {}

        def stream():
            t = time.monotonic()
            try:
                with httpx.stream("POST", f"{url}/chat/completions", json=long, timeout=30) as resp:
                    for _ in resp.iter_lines():
                        ended.setdefault("first", time.monotonic())
            except httpx.HTTPError as e:
                ended["error"] = repr(e)
            ended["end"] = time.monotonic() - t

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        end = time.monotonic() + 30
        while "first" not in ended and time.monotonic() < end:
            time.sleep(0.05)
        assert "first" in ended, "the streaming request never started"
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        t0 = time.monotonic()
        answer = None
        while time.monotonic() - t0 < LIMIT_S:
            try:
                answer = httpx.post(f"{url}/chat/completions", json=body, timeout=LIMIT_S).status_code
                if answer == 503:
                    break
            except httpx.HTTPError:
                answer = "gone"  # rank 0 exited: connection refused
                break
            time.sleep(0.2)
        assert answer in (503, "gone"), answer
        th.join(LIMIT_S)
        assert not th.is_alive() and time.monotonic() - killed < LIMIT_S + 1, "in-flight stream hung"
        assert_all_gone(pids + [launcher])
        log = (tmp_path / "cluster.log").read_text()
        assert "[rank 1, host 127.0.0.1]" in log, log[-2000:]
    finally:
        down = k2("cluster", "down", env=env)
        assert down.returncode == 0


def test_generate_hosts_while_cluster_up_leaves_it_alone_and_down_stops_it(tiny_checkpoint, tmp_path,
                                                                            monkeypatch):
    """Issue 13: `generate --hosts` during `cluster up` used to overwrite the cluster's state, so
    `status` saw no cluster and `down` said "stopped" while the ranks kept serving."""
    monkeypatch.setenv("K2MLX_STATE_DIR", str(tmp_path))
    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path)}
    hosts = "127.0.0.1,127.0.0.1"
    port = 19000 + os.getpid() % 1000
    up = k2("cluster", "up", "--hosts", hosts, "--model", str(tiny_checkpoint), "--port", str(port),
            "--wait", "120", env=env)
    pids = []
    try:
        assert up.returncode == 0, up.stderr
        [(path, st)] = cstate.running()
        pids = [r["pid"] for r in st["ranks"]] + [st["launcher_pid"]]
        gen = k2("generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--temp", "0",
                 "--max-tokens", "4", "--hosts", hosts, env=env)
        assert gen.returncode == 0, gen.stderr
        assert [p for p, _ in cstate.running()] == [path] and cstate.read(path) == st
        status = k2("cluster", "status", env=env)
        assert status.returncode == 0 and "ok" in status.stdout, status.stdout
        again = k2("cluster", "up", "--hosts", hosts, "--model", str(tiny_checkpoint), "--port",
                   str(port), "--wait", "60", env=env)
        assert again.returncode != 0 and "already running" in again.stderr, again.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200
        down = k2("cluster", "down", env=env)
        assert down.returncode == 0 and "cluster stopped" in down.stdout, down.stdout + down.stderr
        assert_all_gone(pids, within=1.0)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        assert cstate.running() == []
        assert "no cluster is running" in k2("cluster", "down", env=env).stdout
    finally:
        kill_groups(pids)
