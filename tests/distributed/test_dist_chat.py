"""`k2mlx chat --hosts` over two loopback ranks: the chat starts a (tensor) cluster when none
answers, shows its progress, attaches, and stops it when the chat ends (on quit, and through
the watchdog when the chat is SIGKILLed); a cluster that already runs is attached to and left
running; a mode or model mismatch and a non-cluster on the port are one-line errors; the
endpoint URL is right for every host form."""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from k2mlx.cli import build_parser
from k2mlx.commands.chat import HostsCluster, endpoint_url
from k2mlx.distributed import state as cstate
from k2mlx.distributed.hosts import parse_host
from k2mlx.errors import ConfigError
from test_dist_faults import LIMIT_S, assert_all_gone, kill_groups

HOSTS = "127.0.0.1,127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_args(*argv):
    """`k2mlx chat ARGV` as the real parser reads it (the command's own defaults)."""
    return build_parser().parse_args(["chat", *argv])


def k2(*args, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "k2mlx.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def cluster_pids(port: int) -> list[int]:
    """Launcher and rank pids of the cluster serving `port` (from its state file)."""
    [(_, st)] = cstate.find(hosts=["127.0.0.1", "127.0.0.1"], port=port)
    return [st["launcher_pid"]] + [r["pid"] for r in st["ranks"]]


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("k2mlx chat: error: "), lines
    return lines[0]


# ---- the URL for every host form -----------------------------------------------------------
@pytest.mark.parametrize("text,url", [
    ("127.0.0.1", "http://127.0.0.1:8123/v1"),
    ("alice@127.0.0.1:2222", "http://127.0.0.1:8123/v1"),   # user and ssh port are ssh's, not HTTP's
    ("127.0.0.1:2222", "http://127.0.0.1:8123/v1"),
    ("localhost", "http://127.0.0.1:8123/v1"),
    ("::1", "http://[::1]:8123/v1"),
    ("[::1]", "http://[::1]:8123/v1"),
    ("bob@[2001:db8::1]:2200", "http://[2001:db8::1]:8123/v1"),
    ("[2001:db8:0::1]:22", "http://[2001:db8::1]:8123/v1"),
])
def test_endpoint_url_for_each_host_form(text, url):
    assert endpoint_url(parse_host(text), 8123) == url
    args = chat_args("--hosts", f"{text},127.0.0.1", "--port", "8123")
    assert HostsCluster(args).url == url  # what the command builds


def test_bracketed_ipv6_keeps_user_and_ssh_port():
    h = parse_host("bob@[2001:db8::1]:2200")
    assert (h.user, h.address, h.ssh_port) == ("bob", "2001:db8::1", 2200) and not h.is_local


@pytest.mark.parametrize("bad", ["[::1", "[::1]x", "[::1]:0", "[::1]:99999", "[]", "[::1]:ssh"])
def test_malformed_bracketed_hosts_are_one_line_errors(bad):
    with pytest.raises(ConfigError):
        parse_host(bad)


@pytest.mark.parametrize("argv,says", [
    (["--parallel", "tensor"], "--parallel is for --hosts"),
    (["--model", "m", "--endpoint", "http://127.0.0.1:9/v1"], "an --endpoint already serves one"),
    (["--hosts", "127.0.0.1"], "at least two hosts"),
    (["--hosts", "bad..host,127.0.0.1"], "cannot resolve host name 'bad..host'"),
    (["--hosts", "[::1,127.0.0.1"], "bad host '[::1'"),
])
def test_bad_chat_hosts_input_is_a_one_line_error(tmp_path, argv, says):
    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path)}
    assert says in one_error_line(k2("chat", *argv, env=env, timeout=60))


def test_chat_hosts_with_a_bad_model_fails_in_preflight_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("K2MLX_STATE_DIR", str(tmp_path))
    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path)}
    p = k2("chat", "--hosts", HOSTS, "--model", str(tmp_path / "nothing"), "--port", str(free_port()),
           env=env, timeout=60)
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert "config.json not found" in errors[0]
    assert cstate.running() == [] and not (tmp_path / "cluster.log").exists()  # no supervisor was started


# ---- start, attach, quit -------------------------------------------------------------------
async def _one_turn(app, text: str = "Hello, who are you?"):
    """Connect (the app's own connect path), send one prompt, return (reply text, cluster info)."""
    from k2mlx.tui.widgets.chat import AssistantMessage

    async with app.run_test(size=(120, 30)) as pilot:
        end = asyncio.get_running_loop().time() + 240
        while not (app.ready.is_set() and app.cluster_info is not None):
            assert asyncio.get_running_loop().time() < end, "the chat never connected to the cluster"
            await pilot.pause(0.1)
        await pilot.click("#prompt")
        app.query_one("#prompt").insert(text)
        await pilot.press("enter")
        while app.turns_done < 1:
            assert asyncio.get_running_loop().time() < end, "no reply"
            await pilot.pause(0.1)
        replies = list(app.query(AssistantMessage))
        info = dict(app.cluster_info)
        messages = app.wire_messages()[:-1]
        tools = app.registry.specs()
        await pilot.press("ctrl+q")
    return replies[-1].text, info, messages, tools


def _app(tmp_path, connect):
    from k2mlx.tui.app import ChatApp
    from k2mlx.tui.sessions import SessionStore

    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    return ChatApp(connect=connect, store=SessionStore(tmp_path / "sessions.db"), workspace=ws,
                   temperature=0.0, max_tokens=16, cluster_poll_s=0)


def test_chat_starts_a_tensor_cluster_replies_like_one_process_and_quit_stops_it(
        tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("K2MLX_STATE_DIR", str(tmp_path / "state"))
    port = free_port()
    args = chat_args("--hosts", HOSTS, "--parallel", "tensor", "--model", str(tiny_checkpoint),
                     "--port", str(port), "--wait", "240")
    cluster = HostsCluster(args)
    said: list[str] = []
    shown: list[str] = []
    pids: list[int] = []
    try:
        cluster.open(say=said.append)
        assert cluster.started and not cluster.attached, said
        assert any("1/2 of every layer" in m for m in said), said  # cluster up's own preflight ran

        def connect(progress):
            backend = cluster.connect(lambda m: (shown.append(m), progress(m)))
            pids.extend(cluster_pids(port) + [cluster.watchdog.pid])
            return backend

        reply, info, messages, tools = asyncio.run(_one_turn(_app(tmp_path, connect)))
        assert shown and shown[0].startswith("starting 2 ranks (tensor)"), shown  # progress in the status bar
        assert info["parallel"] == "tensor" and [r["health"] for r in info["ranks"]] == ["ok", "ok"]
        assert reply
        # the same request to one process on the same checkpoint: the same greedy text
        from openai import OpenAI

        from k2mlx.tui.local import LocalServer

        single = LocalServer(tiny_checkpoint, max_batch=1)
        single.start()
        try:
            ref = OpenAI(base_url=single.base_url, api_key="x").chat.completions.create(
                model=single.model_name, messages=messages, tools=tools, temperature=0.0, max_tokens=16)
        finally:
            single.stop()
        assert reply == ref.choices[0].message.content
        assert answers(port)
        said_at_end = cluster.close()  # what `k2mlx chat` does when the app ends
        assert said_at_end.startswith("stopped the cluster it started"), said_at_end
        assert "checked gone" in said_at_end
        assert_all_gone(pids, within=1.0)  # close() returns only once they are gone
        assert not answers(port) and cstate.running() == []
    finally:
        if cluster.started:
            cluster.close()
        kill_groups(pids)


def test_chat_attaches_to_a_running_cluster_leaves_it_running_and_refuses_a_mismatch(
        tiny_checkpoint, tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("K2MLX_STATE_DIR", str(state))
    env = {**os.environ, "K2MLX_STATE_DIR": str(state)}
    port = free_port()
    up = k2("cluster", "up", "--hosts", HOSTS, "--model", str(tiny_checkpoint), "--port", str(port),
            "--wait", "240", env=env, timeout=300)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stderr
        pids = cluster_pids(port)
        # the real command, another mode: one line saying how to restart it; nothing started
        line = one_error_line(k2("chat", "--hosts", HOSTS, "--port", str(port), "--parallel", "tensor",
                                 env=env, timeout=60))
        assert "runs --parallel pipeline" in line and "k2mlx cluster down" in line and "--parallel tensor" in line
        other = tmp_path / "other-model"
        other.mkdir()
        line = one_error_line(k2("chat", "--hosts", HOSTS, "--port", str(port), "--model", str(other),
                                 env=env, timeout=60))
        assert f"not {other}" in line and "k2mlx cluster down" in line
        assert [p for p, _ in cstate.running()] and cluster_pids(port) == pids

        cluster = HostsCluster(chat_args("--hosts", HOSTS, "--port", str(port), "--parallel", "pipeline"))
        said: list[str] = []
        cluster.open(say=said.append)
        assert cluster.attached and not cluster.started and cluster.watchdog is None, said
        assert said and said[0].startswith("attached to the running cluster"), said
        reply, info, _, _ = asyncio.run(_one_turn(_app(tmp_path, cluster.connect)))
        assert reply and info["parallel"] == "pipeline"
        left = cluster.close()
        assert "keeps running" in left, left
        assert answers(port) and all(cstate.group_alive(p) for p in pids[1:]) and cstate.alive(pids[0])
    finally:
        down = k2("cluster", "down", env=env, timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
        kill_groups(pids)
    assert_all_gone(pids, within=1.0)


def test_chat_waits_for_a_cluster_still_starting_attaches_and_leaves_it(tiny_checkpoint, tmp_path, monkeypatch):
    """`cluster up` launched in the background; the chat opened while its ranks still load
    waits for it (not a second cluster) and attaches."""
    state = tmp_path / "state"
    monkeypatch.setenv("K2MLX_STATE_DIR", str(state))
    env = {**os.environ, "K2MLX_STATE_DIR": str(state)}
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "k2mlx.cli", "cluster", "up", "--hosts", HOSTS, "--model",
                           str(tiny_checkpoint), "--port", str(port), "--wait", "240"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        end = time.monotonic() + 120
        while not cstate.find(hosts=["127.0.0.1", "127.0.0.1"], port=port):  # the supervisor has claimed it
            assert time.monotonic() < end and up.poll() is None, up.communicate()
            time.sleep(0.02)
        cluster = HostsCluster(chat_args("--hosts", HOSTS, "--port", str(port), "--parallel", "pipeline"))
        said: list[str] = []
        cluster.open(say=said.append)
        assert cluster.attached and not cluster.started and cluster.waiting_for is not None, said
        assert "still starting" in said[0]
        shown: list[str] = []
        backend = cluster.connect(shown.append)
        assert backend.base_url == f"http://127.0.0.1:{port}/v1" and answers(port)
        assert up.wait(240) == 0, up.stderr.read()
        pids = cluster_pids(port)
        assert "keeps running" in cluster.close()
        assert answers(port) and cstate.alive(pids[0])
    finally:
        up.kill()
        up.wait()
        k2("cluster", "down", env=env, timeout=60)
        kill_groups(pids)


def test_chat_hosts_on_a_cluster_with_an_api_key(tiny_checkpoint, tmp_path, monkeypatch):
    """Without the cluster's key the probe is a one-line error naming --api-key; with it, the chat
    reads the cluster's status (here: its mode, refused as a mismatch)."""
    state = tmp_path / "state"
    monkeypatch.setenv("K2MLX_STATE_DIR", str(state))
    env = {k: v for k, v in os.environ.items() if k != "K2MLX_API_KEY"}
    env["K2MLX_STATE_DIR"] = str(state)
    port = free_port()
    up = k2("cluster", "up", "--hosts", HOSTS, "--model", str(tiny_checkpoint), "--port", str(port),
            "--api-key", "sesame", "--wait", "240", env=env, timeout=300)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stderr
        pids = cluster_pids(port)
        line = one_error_line(k2("chat", "--hosts", HOSTS, "--port", str(port), env=env, timeout=60))
        assert "wants an API key" in line and "--api-key" in line
        line = one_error_line(k2("chat", "--hosts", HOSTS, "--port", str(port), "--parallel", "tensor",
                                 env={**env, "K2MLX_API_KEY": "sesame"}, timeout=60))
        assert "runs --parallel pipeline" in line
    finally:
        k2("cluster", "down", env=env, timeout=60)
        kill_groups(pids)
    assert_all_gone(pids, within=1.0)


def test_chat_hosts_on_a_single_process_server_is_a_one_line_error(tiny_checkpoint, tmp_path):
    from k2mlx.tui.local import LocalServer

    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path / "state")}
    single = LocalServer(tiny_checkpoint, max_batch=1)
    single.start()
    try:
        port = int(single.base_url.rsplit(":", 1)[1].split("/")[0])
        line = one_error_line(k2("chat", "--hosts", HOSTS, "--port", str(port), env=env, timeout=60))
        assert "single-process" in line and f"--endpoint {single.base_url}" in line
        assert not (tmp_path / "state" / "clusters").exists() or not list((tmp_path / "state" / "clusters").iterdir())
    finally:
        single.stop()


# ---- the real command in a real terminal ---------------------------------------------------
def _tmux(sock, *args, check=True):
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, check=check)


def _pane(sock) -> str:
    return _tmux(sock, "capture-pane", "-p", "-t", "chat", check=False).stdout


def _status_line(sock) -> str:
    lines = [ln for ln in _pane(sock).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _wait(what, predicate, timeout, sock):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := predicate()):
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; the pane shows:\n{_pane(sock)}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
@pytest.mark.parametrize("end", ["quit", "sigkill", "quit-while-loading"])
def test_k2mlx_chat_hosts_in_a_terminal_stops_the_cluster_it_started(tiny_checkpoint, tmp_path, monkeypatch, end):
    """`k2mlx chat --hosts H,H --parallel tensor` in tmux: it starts the cluster and connects; Ctrl+Q
    stops it (and says so), and so does SIGKILL of the chat (its watchdog): nothing is left."""
    state = tmp_path / "state"
    monkeypatch.setenv("K2MLX_STATE_DIR", str(state))
    port = free_port()
    sock = f"k2mlx-chat-hosts-{os.getpid()}-{end}"
    out = tmp_path / "after.txt"
    keep = {k: v for k, v in os.environ.items() if k.startswith(("K2MLX_", "PYTHON"))}
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**keep, "TERM": "xterm-256color"}.items())
    cmd = (f"cd {tmp_path} && env {env} {sys.executable} -m k2mlx.cli chat --hosts {HOSTS} --parallel tensor "
           f"--model {tiny_checkpoint} --port {port} --wait 240 --sessions-db {tmp_path / 's.db'} "
           f"--workspace {tmp_path}; echo EXIT=$? > {out}; sleep 600")
    _tmux(sock, "new-session", "-d", "-s", "chat", "-x", "130", "-y", "30", cmd)
    pids: list[int] = []
    try:
        if end == "quit-while-loading":  # Ctrl+Q while the ranks load: no wait for the endpoint
            _wait("the ranks to start", lambda: (cstate.find(hosts=["127.0.0.1", "127.0.0.1"], port=port) or
                                                 [(0, {})])[0][1].get("ranks"), 120, sock)
            pids = cluster_pids(port)
            t0 = time.monotonic()
            _tmux(sock, "send-keys", "-t", "chat", "C-q")
            _wait("the chat to exit", out.exists, 30, sock)
            assert out.read_text().strip() == "EXIT=0" and time.monotonic() - t0 < 15
            assert "stopped the cluster it started" in " ".join(_pane(sock).split())
            assert_all_gone(pids, within=1.0)
            assert not answers(port) and cstate.running() == []
            return
        _wait("the chat to connect (model name in the status bar)",
              lambda: Path(tiny_checkpoint).name in _status_line(sock), 120, sock)
        pids = cluster_pids(port)
        chat_pid = int(_tmux(sock, "list-panes", "-t", "chat", "-F", "#{pane_pid}").stdout.split()[0])
        assert answers(port)
        if end == "quit":
            _tmux(sock, "send-keys", "-t", "chat", "C-q")
            _wait("the chat to exit", out.exists, 60, sock)
            assert out.read_text().strip() == "EXIT=0"
            assert "stopped the cluster it started" in " ".join(_pane(sock).split())
            assert_all_gone(pids, within=1.0)
        else:
            shell = chat_pid  # the pane's shell runs the chat as its child
            chat = int(subprocess.run(["pgrep", "-P", str(shell), "-f", "k2mlx.cli chat"], capture_output=True,
                                      text=True).stdout.split()[0])
            os.kill(chat, signal.SIGKILL)
            assert_all_gone(pids, within=LIMIT_S)
            said = f"the chat (pid {chat}) is gone; stopped the cluster it started"
            end_t = time.monotonic() + 10  # the watchdog says so once its checks are done
            while said not in (state / "cluster.log").read_text() and time.monotonic() < end_t:
                time.sleep(0.1)
            log = (state / "cluster.log").read_text()
            assert said in log and "still running" not in log, log[-1500:]
        assert not answers(port) and cstate.running() == []
    finally:
        _tmux(sock, "kill-server", check=False)
        kill_groups(pids)
