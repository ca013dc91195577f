"""`k2mlx chat`: the terminal chat and agent (Textual app in k2mlx.tui).

No arguments: the default local model runs in this process behind the same OpenAI-style
interface as `k2mlx serve`, so a fresh install chats at once.

`--hosts H1,H2`: the cluster on those hosts (see `HostsCluster`). A cluster whose endpoint
already answers is attached to and left running when the chat ends; otherwise the chat starts
one exactly as `k2mlx cluster up` does (its own functions), shows the loading progress in the
status bar, and stops it when the chat ends: on quit, on an error, and (through a watchdog
process) when the chat itself is killed. Who started it decides who stops it."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time

log = logging.getLogger("k2mlx.commands.chat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from k2mlx.commands.flags import number
    from k2mlx.distributed.cli import add_parallel_argument

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--endpoint", metavar="URL",
                     help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (`k2mlx serve`, a cluster)")
    src.add_argument("--hosts", metavar="H1,H2",
                     help="chat with the cluster on these hosts ([user@]address[:ssh_port] in rank order, or a "
                          "cluster file): attach to its endpoint on the first host at --port if one answers "
                          "(left running when the chat ends), else start it as `k2mlx cluster up` does and "
                          "stop it when the chat ends")
    parser.add_argument("--model", metavar="PATH",
                        help="checkpoint folder to run in-process, or with --hosts the cluster's model "
                             "(default: the embedded model)")
    add_parallel_argument(parser)
    parser.add_argument("--port", type=number(1, 65535, kind=int), default=8000,
                        help="cluster endpoint port with --hosts (default 8000)")
    parser.add_argument("--wait", type=number(1), default=600.0,
                        help="with --hosts: seconds to wait for a cluster to start (default 600)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("K2MLX_API_KEY"),
                        help="bearer token for --endpoint or --hosts; a cluster the chat starts requires it "
                             "(env K2MLX_API_KEY)")
    parser.add_argument("--model-name", metavar="NAME", help="model id to request from the endpoint")
    parser.add_argument("--workspace", metavar="DIR", default=".",
                        help="folder the agent's file tools are confined to and the only place run_shell's "
                             "sandbox lets commands write (default: current folder)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="ID",
                        help="resume the latest session, or the session ID")
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument("--temp", type=number(0, 2), default=0.6, help="sampling temperature, 0..2 (default 0.6)")
    parser.add_argument("--max-tokens", type=number(1, kind=int), default=None, help="cap on each reply's length")
    parser.add_argument("--mcp-config", metavar="FILE",
                        help="MCP servers file (default ~/.config/k2mlx/mcp.json: {\"mcpServers\": {...}})")
    parser.add_argument("--sessions-db", metavar="FILE", help="SQLite file for sessions "
                        "(default ~/.local/share/k2mlx/sessions.db, env K2MLX_SESSIONS_DB)")
    approve = parser.add_mutually_exclusive_group()
    approve.add_argument("--yes", action="store_true",
                         help="run tools that write or execute without asking (use with care; run_shell "
                              "without an OS sandbox still asks every time)")
    approve.add_argument("--ask-all", action="store_true",
                         help="ask before every tool call, read-only ones (read_file, list_dir, ...) too")


def run(args) -> int:
    from k2mlx.errors import ConfigError, K2Error

    if args.temp is not None and not 0.0 <= args.temp <= 2.0:
        raise ConfigError(f"--temp must be between 0 and 2, got {args.temp}", key="--temp")
    workspace = os.path.abspath(os.path.expanduser(args.workspace))
    if not os.path.isdir(workspace):
        raise ConfigError(f"--workspace {workspace} is not a folder", key="--workspace")

    from k2mlx.tui.app import ChatApp
    from k2mlx.tui.backend import Backend
    from k2mlx.tui.mcp import load_config
    from k2mlx.tui.sessions import SessionStore

    if args.model is not None and args.endpoint:
        raise ConfigError("--model runs a model here or on --hosts; an --endpoint already serves one",
                          key="--model")
    if args.parallel and not args.hosts:
        raise ConfigError("--parallel is for --hosts (how the cluster splits the model)", key="--parallel")
    mcp_servers = load_config(args.mcp_config)
    backend = None
    connect = None  # a callable that starts the in-process server, when there is no endpoint
    cluster = HostsCluster(args) if args.hosts else None
    if args.endpoint:
        backend = Backend(args.endpoint, api_key=args.api_key, model=args.model_name)
    elif cluster is None:
        if args.model is not None:  # a wrong path fails here in one line, not inside the opened app
            from k2mlx.loading import preflight

            preflight(args.model)  # folder or cached repo id, config, tokenizer
        from k2mlx.tui.local import connect_local

        connect = functools.partial(connect_local, args.model)  # called with a progress callback

    app = store = None
    try:
        if cluster is not None:
            cluster.open()  # attach, or preflight + start: a bad host or mode fails here, in one line
            connect = cluster.connect  # waits (showing progress) until the endpoint answers
        store = SessionStore(args.sessions_db)
        app = ChatApp(backend=backend, connect=connect, store=store, workspace=workspace, mcp_servers=mcp_servers,
                      resume=args.resume, temperature=args.temp, system=args.system, max_tokens=args.max_tokens,
                      auto_approve=args.yes, ask_all=args.ask_all)
        app.run()
    finally:
        if app is not None and app.backend is not None and app.backend.local is not None:
            app.backend.local.stop()
        if store is not None:
            store.close()
        if cluster is not None and (said := cluster.close()):
            print(f"k2mlx chat: {said}", file=sys.stderr, flush=True)
    if app.return_code not in (None, 0):
        raise K2Error("the chat app stopped on an error (rerun with --debug for the traceback)")
    return 0


# ---------------------------------------------------------------------------------- --hosts
def endpoint_url(host, port: int) -> str:
    """The cluster endpoint's URL on `host` (a distributed.hosts.Host: `user@addr:ssh_port`,
    `addr`, `[v6]`, `v6` all parse to one): rank 0 serves it there. The user and the ssh port
    belong to ssh, never to the URL; an IPv6 address is bracketed."""
    addr = host.address
    return f"http://[{addr}]:{port}/v1" if ":" in addr else f"http://{addr}:{port}/v1"


def _local_url(url: str) -> str:
    """A state file's URL as a client reaches it: a wildcard bind answers on loopback."""
    return url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")


class _Pid:
    """`poll()` for a launcher this chat did not start (cluster.wait_endpoint takes a Popen)."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self):
        from k2mlx.procs import pid_alive

        return None if pid_alive(self.pid) else 1


class HostsCluster:
    """The cluster `k2mlx chat --hosts` talks to. `open()` attaches to the endpoint that answers
    on the first host's --port, or starts the cluster (`cluster up`'s preflight and supervisor);
    `connect(progress)` (the TUI's connect path) waits until it answers; `close()` stops it only
    when this chat started it, and says what it did."""

    def __init__(self, args):
        from k2mlx.distributed.hosts import parse_hosts

        self.args = args
        self.hosts = parse_hosts(args.hosts)
        self.addresses = [h.address for h in self.hosts]
        self.port = args.port
        self.where = f"{','.join(str(h) for h in self.hosts)} port {self.port}"
        self.url = endpoint_url(self.hosts[0], self.port)
        self.sup = None            # the supervisor this chat started (a Popen), else None
        self.watchdog = None       # the process that stops it if this chat dies first
        self.attached = False      # found running (or starting) and not ours: left running
        self.waiting_for = None    # the launcher of a cluster that is still starting (not ours)
        self.log_path = None
        self.offset = 0

    @property
    def started(self) -> bool:
        return self.sup is not None

    # ---- attach or start ------------------------------------------------------------------
    def open(self, say=None) -> None:
        from k2mlx.commands import cluster as ccluster
        from k2mlx.distributed import state as cstate
        from k2mlx.errors import ConfigError

        say = say or (lambda m: print(f"k2mlx chat: {m}", file=sys.stderr, flush=True))
        found = cstate.find(hosts=self.addresses, port=self.port)  # started from this machine
        state = found[0][1] if found else None
        if state and state.get("url"):
            self.url = _local_url(state["url"])
        snap = self._probe()
        if snap is not None or state is not None:
            self._check_model(state)
            if snap is not None:
                self._check_mode(snap)
            self.attached = True
            if snap is not None:
                say(f"attached to the running cluster on {self.where} ({snap.get('parallel', 'pipeline')}); "
                    "it stays running when the chat ends")
            else:  # its launcher lives but the endpoint does not answer yet: wait in connect()
                self.waiting_for = state.get("launcher_pid")
                say(f"the cluster on {self.where} is still starting (launcher pid {self.waiting_for}); "
                    "attaching when it answers")
            return
        first = self.hosts[0]
        if not first.is_local and not self.args.api_key:
            raise ConfigError(f"no cluster answers at {self.url}; to start one from here, rank 0's endpoint "
                              f"must listen on {first.address}, which needs --api-key (or K2MLX_API_KEY): "
                              f"pass one, or run the chat on {first}", key="--api-key")
        up = ccluster.up_args(self.args.hosts, model=self.args.model, parallel=self.args.parallel,
                              port=self.port, api_key=self.args.api_key, wait=self.args.wait,
                              host=None if first.is_local else first.address)
        self.sup, self.url, self.log_path, self.offset = ccluster.start(up, say)
        # The supervisor runs in its own session (a Ctrl-C or hangup of this terminal must not
        # reach it half-way); so a watchdog, not the process tree, stops it if this chat dies.
        with open(self.log_path, "ab") as log_file:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", "from k2mlx.commands.chat import watchdog; watchdog()", str(os.getpid()),
                 str(self.sup.pid), json.dumps(self.addresses), str(self.port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
        # reap the supervisor the moment it exits: `cluster down`'s checks read pids, and on
        # macOS (no /proc) an unreaped child of ours would look alive
        threading.Thread(target=self.sup.wait, name="k2mlx-cluster-reaper", daemon=True).start()

    def _probe(self) -> dict | None:
        """GET /v1/cluster: the snapshot when a cluster answers, None when nothing listens;
        anything else answering there is a one-line error."""
        import httpx

        from k2mlx.errors import ClusterError, ConfigError

        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        try:
            r = httpx.get(f"{self.url}/cluster", timeout=3.0, headers=headers)
        except httpx.HTTPError as e:
            log.info("no endpoint at %s yet: %s", self.url, e)
            return None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code == 200 and isinstance(body, dict) and isinstance(body.get("ranks"), list):
            return body
        if r.status_code in (401, 403):
            raise ConfigError(f"the cluster at {self.url} wants an API key: pass --api-key (or K2MLX_API_KEY)",
                              key="--api-key")
        code = ((body or {}).get("error") or {}).get("code") if isinstance(body, dict) else None
        if code == "not_a_cluster":
            raise ClusterError(f"{self.url} is a single-process `k2mlx serve`, not a cluster on these hosts: "
                               f"chat with it with --endpoint {self.url}, or pick another --port")
        raise ClusterError(f"something else answers at {self.url} (HTTP {r.status_code}); pick another --port")

    def _check_mode(self, snap: dict) -> None:
        from k2mlx.errors import ClusterError

        mode, want = snap.get("parallel") or "pipeline", self.args.parallel
        if want and mode != want:
            raise ClusterError(
                f"the cluster on {self.where} runs --parallel {mode}; to chat over {want}, stop it with "
                f"`k2mlx cluster down --hosts {self.args.hosts} --port {self.port}` and start it again with "
                f"`k2mlx chat --hosts {self.args.hosts} --port {self.port} --parallel {want}` "
                f"(or `k2mlx cluster up ... --parallel {want}`)")

    def _check_model(self, state: dict | None) -> None:
        """--model against the running cluster's, when it was started here (its state says)."""
        from k2mlx.distributed.cli import resolve_model
        from k2mlx.errors import ClusterError

        if self.args.model is None or not state or not state.get("model"):
            return
        want = resolve_model(self.args.model)
        if want != state["model"]:
            raise ClusterError(f"the cluster on {self.where} serves {state['model']}, not {want}: leave --model "
                               "out to chat with it, or stop it first with `k2mlx cluster down`")

    # ---- the TUI's connect path -----------------------------------------------------------
    def connect(self, progress=lambda msg: None):
        """Blocking (the app calls it in a thread): wait for the endpoint, then a Backend on it."""
        from k2mlx.commands import cluster as ccluster
        from k2mlx.tui.backend import Backend

        n = len(self.hosts)
        if self.sup is not None:
            mode = self.args.parallel or "pipeline"

            def show(s: float) -> None:
                last = ccluster.log_tail(self.log_path, self.offset, 1)
                note = last[0].removeprefix("k2mlx cluster: ")[:60] if last else ""
                progress(f"starting {n} ranks ({mode}) {s:.0f} s" + (f": {note}" if note else ""))

            progress(f"starting {n} ranks ({mode})")
            ccluster.wait_endpoint(self.sup, self.url, self.args.api_key, self.args.wait, self.log_path,
                                   self.offset, progress=show)
        elif self.waiting_for is not None:
            from k2mlx.distributed.state import state_dir

            ccluster.wait_endpoint(_Pid(self.waiting_for), self.url, self.args.api_key, self.args.wait,
                                   state_dir() / "cluster.log",
                                   progress=lambda s: progress(f"waiting for the cluster to start {s:.0f} s"))
            snap = self._probe()
            if snap is not None:
                self._check_mode(snap)
        return Backend(self.url, api_key=self.args.api_key, model=self.args.model_name)

    # ---- the end --------------------------------------------------------------------------
    def close(self) -> str | None:
        """Stop the cluster when this chat started it (checked gone); leave an attached one.
        Returns what it did, for the user (None: there was neither)."""
        if self.sup is None:
            if not self.attached:
                return None
            return f"the cluster on {self.where} keeps running (stop it with `k2mlx cluster down`)"
        from k2mlx.commands.cluster import stop_started

        left = stop_started(self.sup.pid, self.addresses, self.port)
        if self.watchdog is not None:
            self.watchdog.terminate()
            try:
                self.watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
        self.sup = None
        if left:
            return f"the cluster it started on {self.where} still runs after SIGKILL: {', '.join(left)}"
        return f"stopped the cluster it started on {self.where} (launcher and {len(self.hosts)} ranks checked gone)"


def watchdog() -> None:
    """`python -c ... OWNER SUPERVISOR ADDRESSES PORT`: while the supervisor runs, stop it (and
    every rank) as soon as the chat that started it is gone, however it went (SIGKILL included):
    this process, its child, is then re-parented."""
    from k2mlx.commands.cluster import stop_started
    from k2mlx.procs import pid_alive

    owner, sup, addresses, port = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    while pid_alive(sup):
        if os.getppid() != owner:
            left = stop_started(sup, addresses, port)
            print(f"k2mlx chat watchdog: the chat (pid {owner}) is gone; stopped the cluster it started"
                  + (f"; still running: {', '.join(left)}" if left else ""), file=sys.stderr, flush=True)
            return
        time.sleep(0.5)
