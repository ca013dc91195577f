"""`--hosts` for `k2mlx generate/serve` and the body of `k2mlx cluster up/status/down`.

`run_on_cluster(args, "serve")` is what `k2mlx serve --hosts A,B` does: preflight every host,
split the layers by memory, start one rank per host and, on rank 0, run the very same command
module with the pipeline model in place of a local one (`args.preloaded`). The launcher stays
in the foreground and stops every rank when one fails or on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from k2mlx.errors import ClusterError, ConfigError

log = logging.getLogger("k2mlx.distributed.cli")

from . import state as cstate
from .hosts import ClusterSpec, free_port, load_cluster_file, parse_hosts, pick_port, use_doorbells

# argparse fields never forwarded to rank 0
_DROP = {"hosts", "_module", "preloaded", "on_engine", "copy_model", "backend", "deadline",
         "layers_split", "state", "foreground", "cluster_command", "wait", "parallel"}
PARALLEL = ("pipeline", "tensor")


def add_parallel_argument(parser) -> None:
    """`--parallel` for every command that starts ranks (generate/serve --hosts, cluster up)."""
    parser.add_argument("--parallel", choices=PARALLEL, default=None,
                        help="with --hosts: pipeline (default; each host a range of layers, a second host "
                             "adds throughput) or tensor (each host 1/N of every layer, so each reads 1/N "
                             "of the weights per token: meant for one fast stream over JACCL/RDMA; the "
                             "speed-up is projected in docs/BENCHMARKS.md, not measured on Macs)")


def ssh_opts() -> list[str]:
    import shlex

    return shlex.split(os.environ.get("K2MLX_SSH_OPTS", ""))


def resolve_model(model: str | None) -> str:
    if model is None:
        from k2mlx.loading.resolve import default_model_path

        return str(default_model_path())
    if os.path.isdir(os.path.expanduser(model)):
        return str(Path(model).expanduser().resolve())
    return model  # a repo id: resolved per host by `k2mlx download` (not here)


def prepare(args, command: str, log=print) -> tuple[ClusterSpec, list]:
    """Preflight + plan: the ClusterSpec every rank will get."""
    from . import preflight as pf
    from .launch import make_spec, split_layers

    for k, v in json.loads(os.environ.get("K2MLX_CLUSTER_OPTS", "{}")).items():
        if getattr(args, k, None) in (None, False):  # options `cluster up` hands its supervisor
            setattr(args, k, v)
    hosts = parse_hosts(args.hosts)
    if len(hosts) < 2:
        raise ConfigError("--hosts needs at least two hosts (rank order); on one machine leave "
                          "--hosts out", key="--hosts")
    file = load_cluster_file(args.hosts) if os.path.isfile(args.hosts) else {}
    if file.get("backend") and getattr(args, "backend", None) in (None, "ring"):
        args.backend = file["backend"]
    parallel = getattr(args, "parallel", None) or file.get("parallel") or "pipeline"
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, not {parallel!r}", key="parallel")
    if getattr(args, "backend", "ring") == "jaccl" and not file.get("rdma"):
        raise ClusterError("--backend jaccl needs a cluster file with the 'rdma' device lists "
                           "(see `mlx.distributed_config --backend jaccl`)")
    if command == "serve":
        refuse_duplicate([h.address for h in hosts], args.port)
    model = resolve_model(getattr(args, "model", None))
    slot = free_slot(hosts)
    ring_ports = [pick_port(h, i, slot) for i, h in enumerate(hosts)]
    while len(set(ring_ports)) < len(ring_ports):
        ring_ports = [free_port("127.0.0.1") for _ in hosts]
    hb = pick_port(hosts[0], len(hosts), slot)
    bells = None
    if use_doorbells(hosts, getattr(args, "backend", "ring") or "ring", parallel):
        bells = [pick_port(h, len(hosts) + 1 + i, slot) for i, h in enumerate(hosts)]
        while len(set(bells + ring_ports + [hb])) < 2 * len(hosts) + 1:
            bells = [free_port("127.0.0.1") for _ in hosts]
    ports = [(r, p) for r, p in enumerate(ring_ports)] + [(0, hb)] + list(enumerate(bells or []))
    if command == "serve":
        ports.append((0, args.port))
    log(f"preflight: {len(hosts)} hosts")
    repo = model if _is_repo(model) else None
    local = _repo_config(repo) if repo else model  # config + index only, to plan the split
    infos = pf.probe_all(hosts, None if repo else model, ports, ssh_opts=ssh_opts())
    mem = pf.memories_gb(hosts, infos)
    if parallel == "tensor" and getattr(args, "layers_split", None):
        raise ConfigError("--layers-split is for --parallel pipeline (under tensor parallelism every "
                          "rank runs every layer)", key="--layers-split")
    layers = split_layers(local, len(hosts), mem, json.loads(args.layers_split)
                          if getattr(args, "layers_split", None) else None, parallel=parallel)
    need = _need_bytes(local, mem, layers, parallel)
    reports = pf.evaluate(hosts, infos, None if repo else model, layers, need)
    pf.check(reports, model, copy=getattr(args, "copy_model", False), ssh_opts=ssh_opts(), log=log)
    paths = _download_stages(repo, hosts, layers, log) if repo else None
    fwd = {k: v for k, v in vars(args).items() if k not in _DROP and _jsonable(v)}
    fwd["model"] = model
    spec = make_spec(hosts, model, "k2mlx.distributed.cli:command_role",
                     {"command": command, "args": fwd}, layers=layers,
                     backend=getattr(args, "backend", "ring") or "ring",
                     deadline_s=getattr(args, "deadline", 3.0) or 3.0, heartbeat_port=hb,
                     ring_ports=ring_ports, bell_ports=bells, parallel=parallel)
    spec.rdma = file.get("rdma")
    spec.model_paths = paths
    for r, (a, b) in enumerate(layers):
        log(f"rank {r} {hosts[r]}: " + (f"1/{len(hosts)} of every layer" if parallel == "tensor"
                                         else f"layers {a}..{b - 1}"))
    return spec, reports


def refuse_duplicate(addresses: list[str], port: int) -> None:
    """A second server on the same hosts and port is refused here, before any preflight, with
    the way out (a port clash found later by preflight would not say that a cluster holds it)."""
    for _, st in cstate.find(hosts=addresses, port=port):
        raise ClusterError(f"a cluster is already running on {','.join(st.get('hosts') or addresses)} "
                           f"port {port} ({st.get('url')}, launcher pid {st.get('launcher_pid')}): "
                           "use it, or stop it first with `k2mlx cluster down`")


def free_slot(hosts) -> int:
    """The first remote port range (hosts.remote_port) that no live cluster holds on these hosts."""
    from .hosts import remote_port

    remote = {h.address for h in hosts if not h.is_local}
    if not remote:
        return 0
    used = cstate.ports_in_use(remote)
    n = 2 * len(hosts) + 1
    for slot in range(64):
        if not used & {remote_port(i, slot) for i in range(n)}:
            return slot
    raise ClusterError("every remote port range is held by a running cluster; stop one first")


def _is_repo(model: str) -> bool:
    return not os.path.exists(model) and model.count("/") == 1 and not model.startswith((".", "~"))


def _repo_config(repo: str) -> str:
    from huggingface_hub import snapshot_download

    from k2mlx.loading.shards import INDEX

    return snapshot_download(repo, allow_patterns=["config.json", INDEX])


def _download_stages(repo: str, hosts, layers, log) -> list[str]:
    """Each host fetches only the shards its layers need (`k2mlx download --layers`)."""
    import shlex
    import subprocess

    from .preflight import ssh_base

    paths = []
    for r, (h, (a, b)) in enumerate(zip(hosts, layers)):
        log(f"rank {r} {h}: downloading the shards of layers {a}..{b - 1} of {repo}")
        cmd = [sys.executable, "-m", "k2mlx.cli", "download", repo, "--layers", f"{a}:{b}", "--quiet"]
        if not h.is_local:
            cmd = ssh_base(h, ssh_opts()) + [shlex.join(cmd)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = p.stdout.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise ClusterError(f"download of {repo} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}",
                               host=str(h), rank=r)
        paths.append(lines[-1].strip())
    return paths


def _need_bytes(model, mem, layers, parallel: str = "pipeline") -> list[int] | None:
    try:
        from k2mlx.loading import load_args
        from k2mlx.loading.plan import make_plan

        args = load_args(model)
        q = getattr(args, "quantization", None) or {}
        bits, gs = q.get("bits", 16), q.get("group_size", 64)
        plan = make_plan(args, [max(m, 1.0) for m in mem], bits, gs)
        if parallel == "tensor":
            from .tensor_plan import tensor_plan

            return [h["weight_bytes"] for h in tensor_plan(plan, args, [max(m, 1.0) for m in mem], bits, gs, 0)["hosts"]]
        s = plan["layer_bytes"]
        n = len(layers)
        return [sum(s[a:b]) + (plan["embed_bytes"] if r == 0 else 0)
                + (plan["head_bytes"] if r == n - 1 else 0) for r, (a, b) in enumerate(layers)]
    except Exception:  # a model the planner cannot size: skip the memory check
        log.warning("cannot size %s for the memory check; skipped", model, exc_info=True)
        return None


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def run_on_cluster(args, command: str) -> int:
    """Foreground: `k2mlx generate|serve --hosts ...`. The cluster claims its own state file
    (see state.py) and removes it when it ends: it never touches another cluster's."""
    from .launch import Launcher

    quiet = command == "generate"
    log = (lambda m: print(f"k2mlx cluster: {m}", file=sys.stderr, flush=True))
    spec, _ = prepare(args, command, log=(lambda m: None) if quiet else log)
    addresses = [h["address"] for h in spec.hosts]
    port = args.port if command == "serve" else int(spec.heartbeat.rsplit(":", 1)[1])
    extra = {"command": command, "url": _url(args, spec) if command == "serve" else None,
             "http_port": args.port if command == "serve" else None}
    path = getattr(args, "state", None)
    claimed = None
    if path is None:
        claimed = cstate.claim(cstate.cluster_key(addresses, port),
                               {"launcher_pid": os.getpid(), "addresses": addresses, "ranks": [], **extra})
        path = str(claimed)
    launcher = Launcher(spec, state_path=path, ssh_opts=ssh_opts())
    launcher.state_extra = extra
    try:
        return launcher.run()
    finally:
        if claimed is not None:  # the launcher has stopped every rank by now
            claimed.unlink(missing_ok=True)


def _url(args, spec) -> str:
    host = getattr(args, "host", "127.0.0.1")
    return f"http://{host}:{args.port}/v1"


def command_role(pipe, tokenizer, *, spec, health, command: str, args: dict) -> int:
    """Rank 0: run the command module with the pipeline as its model."""
    import importlib

    ns = argparse.Namespace(**args)
    ns.hosts = None
    ns.preloaded = (pipe, tokenizer)
    if command == "serve":
        health.info["url"] = _url(ns, spec)

        def on_engine(engine):
            engine.cluster_status = health.snapshot  # served as GET /v1/cluster
            def fail(err):
                # In-flight requests end with the error; new ones get 503 (engine.failure).
                try:
                    engine.fail(err)  # thread-safe; sets engine.failure (503) at once
                except Exception:
                    engine.failure = err
                time.sleep(1.0)  # let the server flush those answers before the process exits

            health.on_failure(fail)

        ns.on_engine = on_engine
    mod = importlib.import_module(f"k2mlx.commands.{command}")
    return int(mod.run(ns) or 0)
