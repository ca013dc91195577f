"""One state file per running cluster: `STATE_DIR/clusters/<key>.json` (STATE_DIR is
`K2MLX_STATE_DIR`, default `~/.k2mlx`, mode 0700).

Why per cluster: `generate --hosts` while `cluster up` serves used to overwrite the one state
file, so `cluster status` lost the cluster and `cluster down` stopped nothing. Now a launch
*claims* its own file exclusively (O_EXCL) before any rank starts; the key is the hosts in rank
order plus the HTTP port for a server, or plus the heartbeat port for a one-off `generate`
(always fresh, so it never collides). A second launch with the same key is refused while the
first one's launcher lives; a file whose launcher and local ranks are all gone is stale and is
replaced. The launcher removes its file when it ends; `cluster down` removes it only after it
has checked that every process is gone.

Each file holds the launcher pid, the heartbeat address and token (for `cluster status`), the
ranks' pids (local process groups, remote pids), the URL when serving, and the ports each
address uses (remote ranks use a fixed port range, so a second cluster on the same hosts picks
a range no live cluster holds).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from k2mlx.errors import ClusterError
from k2mlx.procs import pid_alive

log = logging.getLogger("k2mlx.distributed.state")


def state_dir() -> Path:
    d = Path(os.environ.get("K2MLX_STATE_DIR") or Path.home() / ".k2mlx")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def clusters_dir() -> Path:
    d = state_dir() / "clusters"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def cluster_key(addresses: list[str], port: int) -> str:
    """A file name for hosts in rank order + a port: readable, and safe for any host text."""
    text = ",".join(addresses) + f":{port}"
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in text)[:80]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


alive = pid_alive  # the cluster commands' name for it


def group_alive(pgid) -> bool:
    """Any live member of a local rank's process group (ranks run in their own session)."""
    if type(pgid) is not int or pgid <= 0:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid and alive(int(d)):
                    return True
            except (ProcessLookupError, PermissionError):
                continue
    return False


def is_live(state: dict) -> bool:
    """The launcher, or any local rank, still runs (orphaned ranks still count: `down` kills them)."""
    if alive(state.get("launcher_pid")):
        return True
    return any(group_alive(r.get("pid")) for r in state.get("ranks", []) if r.get("local"))


def read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write(path: Path, state: dict) -> None:
    """Atomic replace through an exclusive temp file in the same folder."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def claim(key: str, state: dict) -> Path:
    """Create this cluster's state file, exclusively. Raises a ClusterError when a live
    cluster holds the key; replaces a stale file."""
    path = clusters_dir() / f"{key}.json"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            old = read(path)
            if old is not None and is_live(old):
                where = old.get("url") or ",".join(old.get("hosts", []))
                raise ClusterError(
                    f"a cluster is already running on these hosts and port ({where}, launcher pid "
                    f"{old.get('launcher_pid')}); stop it first with `k2mlx cluster down`") from None
            log.info("replacing the stale cluster state %s", path)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1)
        return path
    raise ClusterError(f"cannot claim the cluster state file {path} (another launch races for it)")


def running() -> list[tuple[Path, dict]]:
    """Every live cluster's (path, state); stale files are removed on the way."""
    out = []
    for path in sorted(clusters_dir().glob("*.json")):
        st = read(path)
        if st is None:
            continue
        if is_live(st):
            out.append((path, st))
        else:
            path.unlink(missing_ok=True)
    return out


def ports_in_use(addresses: set[str]) -> set[int]:
    """Ports that live clusters hold on these addresses."""
    used: set[int] = set()
    for _, st in running():
        for addr, ports in (st.get("ports") or {}).items():
            if addr in addresses:
                used.update(p for p in ports if type(p) is int)
    return used


def find(url: str | None = None, hosts: list[str] | None = None, port: int | None = None
         ) -> list[tuple[Path, dict]]:
    """Live clusters matching every selector given (URL origin, host addresses, HTTP port)."""
    def origin(u: str) -> str:
        u = u.rstrip("/")
        return u[: -len("/v1")] if u.endswith("/v1") else u

    out = []
    for path, st in running():
        if url is not None and (not st.get("url") or origin(st["url"]) != origin(url)):
            continue
        if hosts is not None and st.get("addresses") != hosts:
            continue
        if port is not None and st.get("http_port") != port:
            continue
        out.append((path, st))
    return out
