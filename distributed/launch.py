"""Start every rank (local process or ssh), watch them, and take them all down together.

The launcher is the one place that sees every process. Local ranks run in their own process
group (so a kill reaches anything they start) and die with the launcher (PDEATHSIG on Linux, a
getppid watch on macOS). Remote ranks run under `ssh -tt`: when the ssh client goes, the remote
pty hangs up; the remote pid is printed first so `stop()` can also kill it explicitly; and the
heartbeat deadline stops any rank that lost rank 0 anyway. When one rank exits with an error,
the launcher stops the others at once and raises a ClusterError naming that rank and host.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time

from k2mlx.errors import ClusterError

from .health import EXIT_CLUSTER
from .hosts import ClusterSpec, Host, free_port, pick_port, use_doorbells

PID_TAG = "K2MLX_PID"
ERROR_TAG = "K2MLX_ERROR"


def even_split(num_layers: int, n: int) -> list[list[int]]:
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return [[bounds[i], bounds[i + 1]] for i in range(n)]


def split_layers(model_path: str | None, n: int, memories_gb: list[float] | None = None,
                 layers: list[list[int]] | None = None, parallel: str = "pipeline") -> list[list[int]]:
    """Layer ranges per rank: explicit, else the loading helper's memory-balanced plan; under
    tensor parallelism every rank runs every layer (holding 1/N of each)."""
    if layers is not None:
        return [list(r) for r in layers]
    from k2mlx.loading import load_args  # config only: cheap

    args = load_args(model_path)
    if parallel == "tensor":
        return [[0, args.num_hidden_layers] for _ in range(n)]
    if memories_gb and n > 1:
        try:
            from k2mlx.loading.plan import split_layers as plan_split
        except ImportError:
            plan_split = None
        if plan_split is not None:
            q = getattr(args, "quantization", None) or {}
            ranges = plan_split(args, memories_gb, q.get("bits", 4), q.get("group_size", 64), 4096)
            return [[r.start, r.stop] for r in ranges]
    return even_split(args.num_hidden_layers, n)


def make_spec(hosts: list[Host], model: str | None, role: str, role_args: dict | None = None,
              layers: list[list[int]] | None = None, backend: str = "ring",
              deadline_s: float = 3.0, heartbeat_port: int | None = None,
              ring_ports: list[int] | None = None, bell_ports: list[int] | None = None,
              parallel: str = "pipeline") -> ClusterSpec:
    h0 = hosts[0].address
    if ring_ports is None:
        # Distinct ports even when two ranks share an address (loopback tests).
        ring_ports = [pick_port(h, i) for i, h in enumerate(hosts)]
        while len(set(ring_ports)) < len(ring_ports):
            ring_ports = [free_port("127.0.0.1") for _ in hosts]
    return ClusterSpec(
        hosts=[{"address": h.address, "user": h.user, "ssh_port": h.ssh_port, "name": h.name}
               for h in hosts],
        layers=layers,
        heartbeat=f"{h0}:{heartbeat_port or pick_port(hosts[0], len(hosts))}",
        ring_ports=ring_ports, backend=backend, model=model, role=role,
        bell_ports=(bell_ports or _ports(hosts, avoid=ring_ports)) if use_doorbells(hosts, backend, parallel)
        else None, parallel=parallel,
        role_args=role_args or {}, deadline_s=deadline_s, token=secrets.token_hex(8))


def _ports(hosts: list[Host], avoid: list[int]) -> list[int]:
    """One free port per rank, distinct from `avoid` and from each other."""
    out: list[int] = []
    for i, h in enumerate(hosts):
        p = pick_port(h, len(hosts) + 1 + i)
        while p in out or p in avoid:
            p = free_port("127.0.0.1")
        out.append(p)
    return out


class RankProcess:
    def __init__(self, rank: int, host: Host, popen: subprocess.Popen):
        self.rank, self.host, self.popen = rank, host, popen
        self.remote_pid: int | None = None
        self.error_file: str | None = None
        self.reported: dict | None = None  # the ClusterError this rank saw, if any

    def report(self) -> dict | None:
        if self.reported is None and self.error_file and os.path.exists(self.error_file):
            try:
                with open(self.error_file) as f:
                    self.reported = json.load(f)
            except (OSError, ValueError):
                pass
        return self.reported


class Launcher:
    def __init__(self, spec: ClusterSpec, python: str | None = None, cwd: str | None = None,
                 ssh_opts: list[str] | None = None, log=None, rank0_inherit: bool = True,
                 extra_env: dict | None = None, state_path: str | None = None):
        self.spec = spec
        self.python = python or sys.executable
        self.cwd = cwd or os.getcwd()
        self.ssh_opts = ssh_opts if ssh_opts is not None else shlex.split(
            os.environ.get("K2MLX_SSH_OPTS", ""))
        self.log = log or sys.stderr
        self.rank0_inherit = rank0_inherit
        self.extra_env = extra_env or {}
        self.procs: list[RankProcess] = []
        self.error: ClusterError | None = None
        self.state_path = state_path
        self.state_extra: dict = {}

    # ---- start --------------------------------------------------------------------------
    def ssh_command(self, host: Host, remote: str, tty: bool = True) -> list[str]:
        cmd = ["ssh"] + (["-tt"] if tty else []) + [
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"] + self.ssh_opts
        if host.ssh_port:
            cmd += ["-p", str(host.ssh_port)]
        return cmd + [host.ssh_target, remote]

    def start(self) -> "Launcher":
        try:
            self._start()
        finally:
            self.write_state()
        return self

    def write_state(self, **extra) -> None:
        """JSON with every rank's pid (for `cluster status/down` and the tests); see state.py."""
        if not self.state_path:
            return
        from pathlib import Path

        from . import state as cstate

        sp = self.spec
        ports: dict[str, list[int]] = {}
        for r, h in enumerate(sp.hosts):
            ports.setdefault(h["address"], []).extend(
                [sp.ring_ports[r]] + ([sp.bell_ports[r]] if sp.bell_ports else []))
        ports.setdefault(sp.hosts[0]["address"], []).append(int(sp.heartbeat.rsplit(":", 1)[1]))
        st = {"launcher_pid": os.getpid(), "heartbeat": sp.heartbeat, "token": sp.token,
              "layers": sp.layers, "model": sp.model, "hosts": [str(sp.host(r)) for r in range(sp.size)],
              "addresses": [h["address"] for h in sp.hosts], "ports": ports,
              "ranks": [{"rank": rp.rank, "host": str(rp.host), "address": rp.host.address,
                         "local": rp.host.is_local, "user": rp.host.user, "ssh_port": rp.host.ssh_port,
                         "pid": rp.popen.pid, "remote_pid": rp.remote_pid} for rp in self.procs],
              **self.state_extra, **extra}
        self.state_extra.update(extra)
        cstate.write(Path(self.state_path), st)

    def _start(self) -> None:
        import tempfile

        self._tmp = tempfile.mkdtemp(prefix="k2mlx-launch-")
        for rank in range(self.spec.size):
            host = self.spec.host(rank)
            env = {**self.spec.rank_env(rank), **self.extra_env}
            if os.environ.get("K2MLX_LOG_LEVEL"):  # remote ranks get only what is exported
                env.setdefault("K2MLX_LOG_LEVEL", os.environ["K2MLX_LOG_LEVEL"])
            err_file = None
            if host.is_local:
                err_file = os.path.join(self._tmp, f"rank{rank}.error.json")
                env["K2MLX_ERROR_FILE"] = err_file
            else:
                env["K2MLX_ERROR_TAG"] = "1"
            argv = [self.python, "-m", "k2mlx.distributed.rank"]
            inherit = rank == 0 and self.rank0_inherit and host.is_local
            if host.is_local:
                p = subprocess.Popen(argv, env={**os.environ, **env}, cwd=self.cwd,
                                     start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=None if inherit else subprocess.PIPE,
                                     stderr=None if inherit else subprocess.STDOUT)
            else:
                exports = " ".join(f"export {k}={shlex.quote(v)};" for k, v in env.items())
                remote = (f"echo {PID_TAG} $$; cd {shlex.quote(self.cwd)} 2>/dev/null; {exports} "
                          f"exec {shlex.join(argv)}")
                p = subprocess.Popen(self.ssh_command(host, remote), start_new_session=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
            rp = RankProcess(rank, host, p)
            rp.error_file = err_file
            self.procs.append(rp)
            if p.stdout is not None:
                threading.Thread(target=self._pump, args=(rp,), daemon=True).start()

    def _pump(self, rp: RankProcess) -> None:
        prefix = f"[rank {rp.rank} {rp.host}] "
        for raw in iter(rp.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith(PID_TAG):
                try:
                    rp.remote_pid = int(line.split()[1])
                    self.write_state()
                except (IndexError, ValueError, OSError):
                    pass
                continue
            if line.startswith(ERROR_TAG):
                try:
                    rp.reported = json.loads(line.split(" ", 1)[1])
                except (IndexError, ValueError):
                    pass
                continue
            try:
                self.log.write(prefix + line + "\n")
                self.log.flush()
            except (OSError, ValueError):
                pass

    # ---- watch --------------------------------------------------------------------------
    def poll(self) -> int | None:
        """None while all run; else the launcher's exit code (and every rank stopped)."""
        exited = [(rp, rp.popen.poll()) for rp in self.procs]
        done = [(rp, rc) for rp, rc in exited if rc is not None]
        if not done:
            return None
        if all(rc in (0, None) for _, rc in exited):
            # Workers exit 0 only when rank 0 told them to stop: an orderly end in progress.
            if self.procs[0].popen.poll() is None:
                return None
            self.stop(grace=5.0)  # rank 0 finished: workers exit on their own
            return 0
        # Someone failed. A rank exiting with EXIT_CLUSTER only noticed a failure; prefer
        # the one that caused it if it shows up within a moment.
        culprit = next(((rp, rc) for rp, rc in done if rc != EXIT_CLUSTER), None)
        if culprit is None:
            time.sleep(0.5)
            done = [(rp, rp.popen.poll()) for rp in self.procs if rp.popen.poll() is not None]
            culprit = next(((rp, rc) for rp, rc in done if rc != EXIT_CLUSTER), done[0])
        rp, rc = culprit
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        if rc == 255 and not rp.host.is_local:
            how = "lost its ssh connection (exit 255)"
        seen = rp.report() if rc == EXIT_CLUSTER else None
        if seen and seen.get("rank") is not None and seen["rank"] != rp.rank:
            # rank rp noticed another rank's failure (heartbeat deadline, lost link)
            msg = seen["msg"].split("] ", 1)[-1]
            self.error = ClusterError(f"{msg} (seen by rank {rp.rank}); stopping every rank",
                                      host=seen.get("host"), rank=seen["rank"])
        else:
            self.error = ClusterError(f"{how}; stopping every rank", host=str(rp.host), rank=rp.rank)
        # The survivors notice on their own (a closed link at once, a silent one at the heartbeat
        # deadline) and rank 0 first ends its requests with the error; only then are they stopped.
        self.stop(grace=3.0)
        return self.error.exit_code

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                rc = self.poll()
                if rc is not None:
                    return rc
                if end is not None and time.monotonic() > end:
                    self.stop()
                    raise ClusterError(f"cluster did not finish within {timeout:.0f} s")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def run(self) -> int:
        """start + wait, with SIGTERM turned into an orderly stop; raises on rank failure."""
        old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            self.start()
            rc = self.wait()
        finally:
            signal.signal(signal.SIGTERM, old)
        if self.error is not None:
            raise self.error
        return rc

    # ---- stop ---------------------------------------------------------------------------
    def stop(self, grace: float = 2.0) -> None:
        """Every rank gone within `grace` + a little: TERM, then KILL, local and remote."""
        end = time.monotonic() + grace
        while time.monotonic() < end and any(rp.popen.poll() is None for rp in self.procs):
            if grace <= 2.0:
                break
            time.sleep(0.1)
        running = {rp.rank for rp in self.procs if rp.popen.poll() is None}
        for rp in self.procs:
            if rp.popen.poll() is None:
                _killpg(rp.popen.pid, signal.SIGTERM)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and any(rp.popen.poll() is None for rp in self.procs):
            time.sleep(0.05)
        remote = []
        for rp in self.procs:
            _killpg(rp.popen.pid, signal.SIGKILL)  # the whole group: also any leftovers
            try:
                rp.popen.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
            if not rp.host.is_local and rp.remote_pid and rp.rank in running:
                # The remote side may not have seen the hangup yet (or the link is down, and
                # its own heartbeat deadline will end it): try, but never wait long.
                cmd = self.ssh_command(rp.host, f"kill -9 {rp.remote_pid} 2>/dev/null", tty=False)
                t = threading.Thread(target=_run_quiet, args=(cmd,), daemon=True)
                t.start()
                remote.append(t)
        end = time.monotonic() + 3.0
        for t in remote:
            t.join(max(0.0, end - time.monotonic()))
        if getattr(self, "_tmp", None):
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)


def _run_quiet(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, timeout=5, capture_output=True)
    except (subprocess.TimeoutExpired, OSError):
        pass


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m k2mlx.distributed.launch`: run a role over hosts (tests, benchmarks)."""
    import argparse

    from .hosts import parse_hosts

    ap = argparse.ArgumentParser(prog="python -m k2mlx.distributed.launch")
    ap.add_argument("--hosts", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--role", required=True, help="module:function run on rank 0")
    ap.add_argument("--role-args", default="{}", help="JSON keyword arguments of the role")
    ap.add_argument("--layers", default=None, help='JSON [[start, stop], ...] per rank')
    ap.add_argument("--memory-gb", default=None, help="comma list: memory-balanced split")
    ap.add_argument("--backend", default="ring")
    ap.add_argument("--parallel", default="pipeline", choices=["pipeline", "tensor"])
    ap.add_argument("--deadline", type=float, default=3.0)
    ap.add_argument("--state", default=None, help="write rank pids here (JSON)")
    ap.add_argument("--python", default=None)
    a = ap.parse_args(argv)
    hosts = parse_hosts(a.hosts)
    mem = [float(x) for x in a.memory_gb.split(",")] if a.memory_gb else None
    layers = split_layers(a.model, len(hosts), mem, json.loads(a.layers) if a.layers else None,
                          parallel=a.parallel)
    spec = make_spec(hosts, a.model, a.role, json.loads(a.role_args), layers=layers,
                     backend=a.backend, deadline_s=a.deadline, parallel=a.parallel)
    launcher = Launcher(spec, python=a.python, state_path=a.state)
    try:
        return launcher.run()
    except ClusterError as e:
        print(f"k2mlx launch: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
