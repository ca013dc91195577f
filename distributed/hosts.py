"""Hosts, ports and the per-rank environment.

A cluster is a list of hosts in rank order. Each entry is `[user@]address[:ssh_port]`; the
address is what the other ranks connect to (MLX's ring backend wants IP addresses, so a name is
resolved once here). A cluster file is JSON: `{"hosts": ["10.0.0.1", "10.0.0.2"], "backend":
"ring", "python": "/opt/venv/bin/python", "rdma": [[null, "rdma_en5"], ["rdma_en5", null]]}`
(`rdma` only for the JACCL backend: per rank, the RDMA device towards each other rank, as
`mlx.distributed_config --backend jaccl` prints it).

Every rank gets its whole configuration in one environment variable, `K2MLX_CLUSTER` (JSON), plus
the variables MLX's backends read (`MLX_RANK`, `MLX_HOSTFILE`, `MLX_WORLD_SIZE`,
`MLX_JACCL_COORDINATOR`, `MLX_IBV_DEVICES`).
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import asdict, dataclass, field

from k2mlx.errors import ClusterError, ConfigError

ENV = "K2MLX_CLUSTER"


@dataclass(frozen=True)
class Host:
    address: str            # IP the ranks use to reach this host
    user: str | None = None
    ssh_port: int | None = None
    name: str = ""          # what the user typed, for messages

    @property
    def is_local(self) -> bool:
        """Loopback, or an address of this machine, given without a user or ssh port: then no
        ssh is needed. `user@127.0.0.1:2222` names an ssh login (a container, a tunnel) and is
        reached over ssh like any other host, never started here with its user and port dropped."""
        if self.user is not None or self.ssh_port is not None:
            return False
        try:
            if ipaddress.ip_address(self.address).is_loopback:
                return True
        except ValueError:
            return self.address in ("localhost",)
        with socket.socket() as s:
            try:
                s.bind((self.address, 0))
                return True
            except OSError:
                return False

    @property
    def ssh_target(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address

    def __str__(self) -> str:
        return self.name or self.address


def parse_host(text: str) -> Host:
    text = text.strip()
    if not text:
        raise ConfigError("empty host in --hosts")
    user = None
    if "@" in text:
        user, text = text.split("@", 1)
        if not user or not text:
            raise ConfigError(f"bad host '{user}@{text}' in --hosts (want [user@]address[:ssh_port])")
    port = None
    if text.startswith("["):  # [v6addr] or [v6addr]:ssh_port, the usual way to put a port after IPv6
        inner, sep, rest = text[1:].partition("]")
        if not sep or not inner or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad host '{text}' in --hosts (want [user@][ipv6][:ssh_port])")
        text, p = inner, rest[1:]
        if rest:
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise ConfigError(f"bad ssh port in host '[{text}]:{p}'")
            port = int(p)
    elif text.count(":") == 1:  # host:ssh_port (an IPv6 address has several colons)
        text, p = text.split(":")
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ConfigError(f"bad ssh port in host '{text}:{p}'")
        port = int(p)
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        try:
            address = socket.gethostbyname(text)
        except (OSError, UnicodeError) as e:  # UnicodeError: a name IDNA cannot encode ("a..b")
            raise ClusterError(f"cannot resolve host name '{text}': {e}", host=text) from None
    return Host(address=address, user=user, ssh_port=port, name=text)


def parse_hosts(spec: str | list[str]) -> list[Host]:
    """`--hosts A,B` or a cluster-file path -> hosts in rank order."""
    if isinstance(spec, str) and os.path.isfile(spec):
        return load_cluster_file(spec)["hosts"]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    hosts = [parse_host(h) for h in items if h.strip()]
    if not hosts:
        raise ConfigError("--hosts lists no host")
    return hosts


def load_cluster_file(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read cluster file: {e}", path=path) from None
    if not isinstance(data.get("hosts"), list) or not data["hosts"]:
        raise ConfigError("cluster file needs a non-empty 'hosts' list", key="hosts", path=path)
    data["hosts"] = [parse_host(h) for h in data["hosts"]]
    return data


def use_doorbells(hosts: list[Host], backend: str, parallel: str = "pipeline") -> bool:
    """Decided once, at launch: doorbell sockets beside MLX's ring (see pipeline.Link.open_bells).

    They help only where a waiting rank's busy-polling recv steals CPU from a computing rank:
    ranks sharing one host (measured in docs/BENCHMARKS.md, "Doorbells"). Ranks on separate
    hosts poll their own idle cores, so the extra TCP round per message is pure cost, and JACCL
    (RDMA) has no polling ring recv to work around. Tensor parallelism waits mostly inside
    all_sum, which a doorbell cannot cover: none there. `K2MLX_DOORBELL=1|0` forces it
    (benchmarks)."""
    if parallel != "pipeline":
        return False
    forced = os.environ.get("K2MLX_DOORBELL")
    if forced in ("0", "1"):
        return forced == "1" and backend == "ring"
    addresses = [h.address for h in hosts]
    return backend == "ring" and len(set(addresses)) < len(addresses)


def _ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out for outgoing connections and bind(0) (Linux: from /proc;
    otherwise 32768-65535, which covers Linux's default and macOS's 49152-65535)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 65535


def free_port(address: str = "127.0.0.1") -> int:
    """A port on `address` that is free now, for a server that binds it later (a rank's ring
    port, the health hub). Picked OUTSIDE the ephemeral range: a port from bind(0) can be taken,
    between the pick and the bind seconds later, as the local end of any outgoing connection
    (a heartbeat, an HTTP client), which failed ring joins with "Couldn't bind socket (error:
    98)". Two pickers can still draw the same port; the space (about 12,000 ports) makes that rare."""
    import random

    lo, hi = _ephemeral_range()
    pool = range(20000, lo) if lo > 21000 else range(hi + 1, 65536)
    for port in random.sample(pool, min(64, len(pool))):
        with socket.socket() as s:
            try:
                s.bind((address, port))  # no SO_REUSEADDR: a TIME_WAIT remnant counts as taken
                return port
            except OSError:
                continue
    with socket.socket() as s:  # a crowded low range: whatever the OS gives
        s.bind((address, 0))
        return s.getsockname()[1]


def remote_port(i: int, slot: int = 0) -> int:
    """Ports on another host cannot be picked from here: a fixed range (K2MLX_BASE_PORT,
    default 47310), which preflight checks is free there. `slot` k moves the range by 64*k,
    for a second cluster on the same hosts (see state.ports_in_use)."""
    return int(os.environ.get("K2MLX_BASE_PORT", "47310")) + 64 * slot + i


def pick_port(host: Host, i: int, slot: int = 0) -> int:
    return free_port(host.address) if host.is_local else remote_port(i, slot)


def port_is_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


@dataclass
class ClusterSpec:
    """Everything a rank needs to know, identical on every rank (only MLX_RANK differs)."""

    hosts: list[dict]                 # asdict(Host) per rank
    layers: list[list[int]]           # [start, stop) per rank
    heartbeat: str                    # "address:port" of rank 0's health hub
    ring_ports: list[int]             # one port per rank for MLX's ring backend
    backend: str = "ring"
    model: str | None = None
    role: str = "worker"              # what rank 0 runs: generate | serve | bench | test
    role_args: dict = field(default_factory=dict)
    deadline_s: float = 3.0           # no heartbeat for this long = peer lost
    interval_s: float = 0.5
    token: str = ""                   # shared secret so stray connections are refused
    bell_ports: list[int] | None = None  # doorbell sockets (see pipeline.Link.open_bells)
    model_paths: list[str] | None = None  # per rank, when each host downloaded its own part
    rdma: list | None = None          # JACCL: per rank, the RDMA device towards each rank
    parallel: str = "pipeline"        # or "tensor": every rank 1/N of every layer (tensor.py)

    def host(self, rank: int) -> Host:
        return Host(**self.hosts[rank])

    @property
    def size(self) -> int:
        return len(self.hosts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ClusterSpec":
        return cls(**json.loads(text))

    @classmethod
    def from_env(cls) -> "ClusterSpec | None":
        text = os.environ.get(ENV)
        return cls.from_json(text) if text else None

    def ring_hostfile(self) -> str:
        """MLX's ring hostfile: a JSON list, per rank, of "ip:port" strings it listens on."""
        return json.dumps([[f"{h['address']}:{p}"] for h, p in zip(self.hosts, self.ring_ports)])

    def rank_env(self, rank: int) -> dict[str, str]:
        """Environment variables for one rank (files are passed inline; see launch.py)."""
        env = {ENV: self.to_json(), "MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(self.size)}
        if self.backend == "jaccl":
            env["MLX_JACCL_COORDINATOR"] = f"{self.hosts[0]['address']}:{self.ring_ports[0]}"
            env["K2MLX_IBV_DEVICES"] = json.dumps(self.rdma)  # rank.py writes MLX_IBV_DEVICES
        return env
