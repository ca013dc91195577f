"""`k2mlx cluster up|status|down`: one command for a multi-Mac pipeline endpoint.

`up` checks every host (ssh, versions, model files, memory, wired limit, ports), starts a
supervisor in the background (`k2mlx serve --hosts ...`, which launches one rank per host),
waits until the endpoint answers and prints its URL. `status` asks rank 0's health hub for
every rank's layers, memory and heartbeat; `down` stops the supervisor and every rank.
`k2mlx chat --hosts` starts and stops a cluster with these same functions (`up_args`, `start`,
`wait_endpoint`, `stop_started`).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION")
    up = sub.add_parser("up", help="preflight, start every rank, wait for the endpoint, print its URL")
    up.add_argument("--hosts", required=True,
                    help="comma list in rank order ([user@]address[:ssh_port]) or a cluster file (JSON)")
    up.add_argument("--model", help="checkpoint folder, same path on every host (default: the embedded model)")
    up.add_argument("--backend", default="ring", choices=["ring", "jaccl"],
                    help="MLX distributed backend: ring (TCP/Thunderbolt) or jaccl (RDMA, macOS 26.2+)")
    from k2mlx.distributed.cli import add_parallel_argument

    add_parallel_argument(up)
    up.add_argument("--port", type=int, default=8000, help="HTTP port on rank 0 (default 8000)")
    up.add_argument("--host", default="127.0.0.1", help="address rank 0's server binds (default 127.0.0.1)")
    up.add_argument("--api-key", default=None, help="required to bind a non-loopback address")
    up.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    up.add_argument("--copy-model", action="store_true",
                    help="copy the shard files a host's layers need when they are missing there")
    up.add_argument("--layers-split", default=None, help='explicit split, JSON [[0, 30], [30, 61]]')
    up.add_argument("--deadline", type=float, default=3.0,
                    help="seconds without a heartbeat before a rank counts as lost (default 3)")
    up.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the endpoint (default 600)")
    for name, text in (("status", "each rank's host, layers, memory and health"),
                       ("down", "stop every rank of a running cluster and check they are gone")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--hosts", default=None, help="the cluster on these hosts (as given to `up`)")
        p.add_argument("--port", type=int, default=None, help="the cluster serving this HTTP port")
        if name == "down":
            p.add_argument("--all", action="store_true", help="stop every running cluster")


def _select(args) -> list:
    """Running clusters (state.running), narrowed by --hosts/--port."""
    from k2mlx.distributed import state as cstate

    hosts = None
    if getattr(args, "hosts", None):
        from k2mlx.distributed.hosts import parse_hosts

        hosts = [h.address for h in parse_hosts(args.hosts)]
    return cstate.find(hosts=hosts, port=getattr(args, "port", None))


def _describe(st: dict) -> str:
    what = st.get("url") or f"`{st.get('command') or 'launch'}`"
    return f"{','.join(st.get('hosts') or st.get('addresses') or [])} {what} (launcher pid {st.get('launcher_pid')})"


def run(args) -> int:
    action = getattr(args, "cluster_command", None)
    if action == "up":
        return _up(args)
    if action == "status":
        return _status(args)
    if action == "down":
        return _down(args)
    print("usage: k2mlx cluster {up,status,down} (see k2mlx cluster --help)")
    return 2


def _up(args) -> int:
    import sys

    say = lambda m: print(f"k2mlx cluster: {m}", file=sys.stderr, flush=True)  # noqa: E731
    sup, url, log_path, offset = start(args, say)
    wait_endpoint(sup, url, args.api_key, args.wait, log_path, offset)
    print(url, flush=True)
    return 0


def up_args(hosts: str, **given):
    """The Namespace `k2mlx cluster up --hosts HOSTS` parses to, with `given` (dest=value, None
    for "not given") in place of the defaults: other commands start a cluster through `start`
    with exactly `cluster up`'s defaults, read from its own parser."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args(["up", "--hosts", hosts])
    for k, v in given.items():
        if v is not None:
            setattr(args, k, v)
    return args


def start(args, say):
    """`cluster up` up to the wait: the JACCL tip, preflight and plan in the foreground (a bad
    host or model fails here with the reason), then the supervisor in the background.
    Returns (supervisor Popen, endpoint URL, log path, log offset where this start begins)."""
    import os
    import subprocess
    import sys

    from k2mlx.distributed.cli import prepare
    from k2mlx.distributed.state import state_dir

    if args.backend == "jaccl" and (args.parallel or "pipeline") == "pipeline":
        say("tip: over JACCL (RDMA) --parallel tensor decodes one stream faster than the pipeline "
            "(each Mac reads half of every layer; see docs/BENCHMARKS.md)")
    prepare(args, "serve", log=say)  # fail here, in the foreground, with the reason
    # (a second cluster on the same hosts and port is refused there; the supervisor's
    # exclusive claim of its state file settles a race between two `up`s)
    log_path = state_dir() / "cluster.log"
    cmd = [sys.executable, "-m", "k2mlx.cli", "serve", "--hosts", args.hosts, "--port", str(args.port),
           "--host", args.host, "--max-batch", str(args.max_batch)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ)
    if args.api_key:  # in the environment, not in argv (`ps` shows argv)
        env["K2MLX_API_KEY"] = args.api_key
    env["K2MLX_STATE_DIR"] = str(state_dir())
    extra = {"backend": args.backend, "copy_model": args.copy_model, "layers_split": args.layers_split,
             "deadline": args.deadline, "parallel": args.parallel}
    env["K2MLX_CLUSTER_OPTS"] = __import__("json").dumps(extra)
    with open(log_path, "ab") as log:
        offset = log.tell()
        sup = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                               start_new_session=True)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/v1"
    say(f"starting {len(args.hosts.split(','))} ranks (log: {log_path})")
    return sup, url, log_path, offset


def wait_endpoint(sup, url: str, api_key, wait: float, log_path, offset: int = 0, progress=None) -> None:
    """Until GET /v1/models answers 200. The supervisor ending first raises a ClusterError with
    the last lines this start wrote to the log (from `offset`: the log is shared by every start);
    the wait running out raises one too, and stops the supervisor.
    `progress(seconds_waited)` is called about every half second."""
    import time

    import httpx

    from k2mlx.errors import ClusterError

    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() - t0 < wait:
        if sup.poll() is not None:
            tail = log_tail(log_path, offset, 8)
            raise ClusterError("the cluster stopped while starting:\n  " + "\n  ".join(tail))
        try:
            if httpx.get(f"{url}/models", timeout=2.0, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet: the ranks are still loading
        if progress is not None:
            progress(time.monotonic() - t0)
        time.sleep(0.5)
    _stop_supervisor(sup)
    raise ClusterError(f"the endpoint did not answer within {wait:.0f} s (log: {log_path})")


def log_tail(log_path, offset: int, n: int) -> list[str]:
    """The last `n` lines written to the shared cluster log since `offset`."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").strip().splitlines()[-n:]


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point (a tiny model is not 0.00 GB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _stop_supervisor(sup) -> None:
    """`up` gave up waiting: end the supervisor it started (it stops its ranks on TERM)."""
    import subprocess

    sup.terminate()
    try:
        sup.wait(15)
    except subprocess.TimeoutExpired:
        sup.kill()


def _status(args) -> int:
    from rich.console import Console

    con = Console()
    found = _select(args)
    if not found:
        con.print("no cluster is running")
        return 1
    rc = 0
    for _, st in found:
        rc = max(rc, _status_one(con, st))
    return rc


def _status_one(con, st: dict) -> int:
    from rich.table import Table

    from k2mlx.distributed.health import query_status

    try:
        snap = query_status(st["heartbeat"], st["token"])
    except (OSError, ValueError, KeyError) as e:
        con.print(f"cluster {_describe(st)} is up but rank 0 does not answer: {e}")
        return 1
    t = Table(title=f"k2mlx cluster  {st.get('url') or st.get('command') or ''}")
    for col in ("rank", "host", "layers", "memory (peak)", "health"):
        t.add_column(col)
    for r in snap["ranks"]:
        a, b = r["layers"]
        mem = r.get("memory", {})
        peak = mem.get("mlx_peak") or mem.get("peak_rss") or 0
        age = f" (heartbeat {r['heartbeat_age_s']} s ago)" if "heartbeat_age_s" in r else ""
        share = f" (1/{len(snap['ranks'])} of each)" if snap.get("parallel") == "tensor" else ""
        t.add_row(str(r["rank"]), r["host"], f"{a}..{b - 1}{share}", _size(peak), r["health"] + age)
    con.print(t)
    if snap.get("error"):
        con.print(f"[red]{snap['error']}[/red]")
    return 0


def _down(args) -> int:
    found = _select(args)
    if not found:
        print("no cluster is running")
        return 0
    if len(found) > 1 and not getattr(args, "all", False) and not (args.hosts or args.port):
        print("several clusters are running; choose one with --hosts/--port, or pass --all:")
        for _, st in found:
            print(f"  {_describe(st)}")
        return 2
    rc = 0
    for path, st in found:
        left = _stop(st)
        if left:
            print(f"cluster {_describe(st)}: still running after SIGKILL: {', '.join(left)}")
            rc = 1
        else:
            path.unlink(missing_ok=True)
            n = len(st.get("ranks", []))
            print(f"cluster stopped: {_describe(st)}; launcher and {n} ranks checked gone")
    return rc


def stop_started(launcher_pid: int, addresses: list[str], port: int) -> list[str]:
    """Stop the cluster whose supervisor `start` launched as `down` does, and check that every
    process is gone; return what still runs. Before the supervisor has claimed its state file
    (still in preflight) no rank exists yet: TERM, then KILL, the supervisor alone."""
    import os
    import signal
    import time

    from k2mlx.distributed import state as cstate

    for path, st in cstate.find(hosts=addresses, port=port):
        if st.get("launcher_pid") == launcher_pid:
            left = _stop(st)
            if not left:
                path.unlink(missing_ok=True)
            return left
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if not cstate.alive(launcher_pid):
            return []
        try:
            os.kill(launcher_pid, sig)
        except ProcessLookupError:
            return []
        end = time.monotonic() + wait
        while time.monotonic() < end and cstate.alive(launcher_pid):
            time.sleep(0.1)
    return [f"launcher (pid {launcher_pid})"] if cstate.alive(launcher_pid) else []


def _stop(st: dict) -> list[str]:
    """TERM the launcher (it stops every rank, local and remote), then KILL whatever is left;
    return what still runs (checked: local process groups, remote pids over ssh)."""
    import os
    import signal
    import subprocess
    import time

    from k2mlx.distributed.state import alive, group_alive

    pid = st.get("launcher_pid")
    ranks = [r for r in st.get("ranks", []) if isinstance(r, dict)]
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 10
    while time.monotonic() < end and (alive(pid) or any(group_alive(r.get("pid")) for r in ranks
                                                         if r.get("local"))):
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    left = []
    for r in ranks:
        if r.get("local") and group_alive(r.get("pid")):
            try:
                os.killpg(r["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        elif not r.get("local") and type(r.get("remote_pid")) is int:
            from k2mlx.distributed.cli import ssh_opts
            from k2mlx.distributed.hosts import Host
            from k2mlx.distributed.preflight import ssh_base

            h = Host(address=str(r["address"]), user=r.get("user"), ssh_port=r.get("ssh_port"))
            cmd = ssh_base(h, ssh_opts()) + [f"kill -9 {r['remote_pid']} 2>/dev/null; sleep 0.2; "
                                     f"kill -0 {r['remote_pid']} 2>/dev/null && echo alive"]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
                if "alive" in out:
                    left.append(f"rank {r['rank']} (pid {r['remote_pid']} on {r['host']})")
            except (subprocess.TimeoutExpired, OSError) as e:
                left.append(f"rank {r['rank']} on {r['host']} (cannot check over ssh: {e})")
    end = time.monotonic() + 5
    while time.monotonic() < end and (alive(pid) or any(
            group_alive(r.get("pid")) for r in ranks if r.get("local"))):
        time.sleep(0.1)
    if alive(pid):
        left.append(f"launcher (pid {pid})")
    left += [f"rank {r['rank']} (pid {r['pid']})" for r in ranks
             if r.get("local") and group_alive(r.get("pid"))]
    return left
