"""Entry point of one rank: `python -m k2mlx.distributed.rank` (started by the launcher).

Reads `K2MLX_CLUSTER` and `MLX_RANK`, joins the MLX group and the health hub, loads only this
rank's layers, then rank 0 runs the role (a `module:function` called with the pipeline model)
and the others run the worker loop until rank 0 says stop.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import tempfile

from k2mlx.errors import ClusterError, K2Error

log = logging.getLogger("k2mlx.distributed.rank")


def setup_logging() -> None:
    """A rank's log goes to its stderr (the launcher prefixes it with the rank); the level comes
    from K2MLX_LOG_LEVEL, which the launcher passes on (default: warnings and errors)."""
    level = os.environ.get("K2MLX_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def die_with_parent() -> None:
    """Linux: get SIGKILL when the launcher dies (macOS: the health thread polls getppid)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _private_file(prefix: str, text: str) -> str:
    """A file only this user can read, created exclusively (mkstemp: O_EXCL, mode 0600)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def init_group(spec, rank: int):
    import mlx.core as mx

    if spec.size == 1:
        return mx.distributed.init()
    files = []  # MLX reads them during init only: removed right after, whatever happens
    if spec.backend == "ring":
        files.append(_private_file("k2mlx-ring-", spec.ring_hostfile()))
        os.environ["MLX_HOSTFILE"] = files[-1]
    elif spec.backend == "jaccl":
        if not spec.rdma:
            raise ClusterError("the jaccl backend needs the RDMA devices of every pair: put the "
                               "'rdma' lists from `mlx.distributed_config --backend jaccl` in a "
                               "cluster file", rank=rank)
        files.append(_private_file("k2mlx-ibv-", json.dumps(spec.rdma)))
        os.environ["MLX_IBV_DEVICES"] = files[-1]
    os.environ["MLX_RANK"] = str(rank)
    try:
        group = mx.distributed.init(strict=True, backend=spec.backend)
    except RuntimeError as e:
        log.exception("rank %d: joining the %s group failed", rank, spec.backend)
        raise ClusterError(f"cannot join the {spec.backend} group: {e}",
                           host=str(spec.host(rank)), rank=rank) from None
    finally:
        for path in files:
            try:
                os.unlink(path)
            except OSError:
                log.exception("cannot remove %s", path)
    if group.size() != spec.size:
        raise ClusterError(f"group has {group.size()} ranks, expected {spec.size}", rank=rank)
    return group


def load_stage(spec, rank: int):
    from k2mlx import load

    a, b = spec.layers[rank]
    path = spec.model_paths[rank] if spec.model_paths else spec.model
    return load(path, layers=range(a, b))


def load_tensor_shard(spec, rank: int, group):
    """Tensor parallelism: read only this rank's slices; a format not read in slices is loaded
    whole and then cut (peaking at the full size; see slices.py)."""
    from .slices import load_shard
    from .tensor import shard_model

    path = spec.model_paths[rank] if spec.model_paths else spec.model
    loaded = load_shard(path, rank, spec.size, group)
    if loaded is not None:
        from .health import memory_info

        log.info("rank %d: loaded its slices, peak RSS %.0f MB", rank, memory_info()["peak_rss"] / 1e6)
        return loaded
    model, tokenizer = load_stage(spec, rank)
    shard_model(model, rank, spec.size, group)
    return model, tokenizer


def run_worker(loop, model, link, spec, rank: int) -> int:
    """Ranks 1..N-1: follow rank 0 until it stops us, with this rank's part of the disk prompt
    cache (its layers on a pipeline, every layer under tensor parallelism)."""
    from .disk_pipeline import open_worker_disk

    disk = open_worker_disk(spec, rank, model)
    try:
        loop(model, link, disk)
    finally:
        if disk is not None:
            disk.close()  # queued blocks are written before the rank exits
    return 0


def resolve(role: str):
    mod, _, fn = role.partition(":")
    return getattr(importlib.import_module(mod), fn)


def main() -> int:
    from .health import Health
    from .hosts import ClusterSpec
    from .pipeline import Link, PipelineModel, worker_loop

    die_with_parent()
    setup_logging()
    spec = ClusterSpec.from_env()
    if spec is None:
        print("k2mlx.distributed.rank: K2MLX_CLUSTER is not set (start ranks with the launcher)",
              file=sys.stderr)
        return 2
    rank = int(os.environ["MLX_RANK"])
    pin = os.environ.get("K2MLX_PIN_CPUS")  # benchmarks: one core per rank, like separate hosts
    if pin and hasattr(os, "sched_setaffinity"):
        cpus = [int(c) for c in pin.split(",")]
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    health = Health(spec, rank).start()
    # SIGTERM from the launcher or `cluster down`: exit at once, even inside an MLX wait.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        health.wait_ready()
        group = init_group(spec, rank)
        link = Link(group, spec, health)
        link.open_bells()
        if spec.parallel == "tensor":
            from . import tensor

            model, tokenizer = load_tensor_shard(spec, rank, group)
            if rank != 0:
                return run_worker(tensor.worker_loop, model, link, spec, rank)
            pipe = tensor.TensorModel(model, link)
        else:
            model, tokenizer = load_stage(spec, rank)
            if rank != 0:
                return run_worker(worker_loop, model, link, spec, rank)
            pipe = PipelineModel(model, link, model.args.num_hidden_layers)
        try:
            rc = resolve(spec.role)(pipe, tokenizer, spec=spec, health=health, **spec.role_args)
        finally:
            if health.error is None:
                # From here the workers exit on purpose: their closing heartbeat sockets are
                # the orderly end, not a lost rank (else a race reported one).
                health.stopping = True
                pipe.close()
        health.stop()
        return int(rc or 0)
    except K2Error as e:
        health.report_error(str(e))
        log.debug("rank %d stopped", rank, exc_info=True)
        print(f"k2mlx rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 1)
    except Exception as e:
        health.report_error(f"{type(e).__name__}: {e}")
        log.exception("rank %d failed", rank)
        return 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip interpreter teardown: MLX's ring threads may still hold sockets
