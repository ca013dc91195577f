"""The persistent prompt cache (k2mlx/engine/disk_cache.py) on a pipeline.

Every rank keeps only its own layers' blocks, in its own `DiskPrefixCache` (identity including
its layer range) under the same folder on its own host. Rank 0 uses a disk hit only for the
blocks every rank has:

- Save: when a finished sequence's cache is inserted, rank 0 saves its own layers' blocks and
  logs one op per other rank, ["disk_save", tokens, [object ids of that rank's layers in layer
  order]], which rides the next step's header; the owner replays it on its real caches (its
  writer thread does the I/O). A rank that cannot save (writer behind, full disk) simply has
  fewer blocks, so later hits are shorter there: never wrong.
- Lookup: rank 0 reads its own longest stored prefix (n0 blocks), then sends one synchronous
  OP_DISK round the ring {"pin", "tokens": the n0 blocks' tokens, "n"}; each rank reads and checks
  at most n blocks of its own, keeps what it read in memory under the pin id ("pins" it: an
  eviction or a garbled file after this point cannot change what it installs) and passes on
  n = min(n, its count). Rank 0 takes k = the n that comes back: every rank holds k blocks in
  memory. On a hit it builds the caches (its own layers from its blocks, each other layer a
  RemoteCache whose zero-width shadow has offset k * block) and logs per rank one
  ["disk_load", pin, k * block, [[object id, layer], ...]] that creates the real caches from the
  pin and drops it; on a miss it logs ["disk_unpin", pin].
- A bad, missing or foreign file on any rank makes that rank's count shorter, so the hit is
  shorter (or a miss). A rank whose folder cannot be made runs without a disk cache and answers
  0 (no hit ever). A "disk_load" whose pin is missing can only be a protocol bug: the rank fails
  loudly (the cluster reports it) rather than run with caches that differ from rank 0's view.

Under tensor parallelism (`TensorDiskCache`) the same protocol runs with every rank owning every
layer: the latent KV cache is replicated (distributed/tensor.py), so each rank stores and reads
whole blocks of all layers, and the ops go to every worker (OpLog key ALL). A rank's identity
adds "tensor rank r of N", so ranks sharing a folder on one host keep separate blocks (a hit on
one never depends on another's files or evictions), as ranks on separate hosts do. A hit is the
shortest count over the ranks, as above.
"""
from __future__ import annotations

import itertools
import json
import logging
import math

from k2mlx.engine.disk_cache import kv_arrays

from .remote_cache import RemoteCache

log = logging.getLogger("k2mlx.distributed.disk_pipeline")


def cache_settings(role_args: dict) -> dict | None:
    """{dir, gb, block} of the disk cache the ranks of this cluster use, or None (off). They come
    from the command's forwarded flags (`serve --hosts`: role_args["args"]) or, for a scenario
    role, from its own arguments; without `prompt_cache_gb` there is none (e.g. generate)."""
    args = role_args.get("args", role_args) if isinstance(role_args, dict) else {}
    if not isinstance(args, dict) or args.get("no_prompt_cache") or "prompt_cache_gb" not in args:
        return None
    try:
        gb = float(args.get("prompt_cache_gb") or 0.0)
        block = int(args.get("prompt_cache_block") or 256)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(gb) or gb <= 0 or block < 1:
        return None
    return {"dir": args.get("prompt_cache_dir"), "gb": gb, "block": block}


def open_stage_cache(model, path, settings: dict, tag: str = ""):
    from k2mlx.engine.disk_cache import open_prompt_cache

    return open_prompt_cache(model, path, settings["dir"], max_gb=settings["gb"], block=settings["block"], tag=tag)


def tensor_tag(spec, rank: int) -> str:
    """The identity tag of a tensor-parallel rank's blocks ('' on a pipeline: its layer range
    already tells the ranks apart)."""
    return f"tensor rank {rank} of {spec.size}" if spec.parallel == "tensor" else ""


class PipelineDiskCache:
    """Rank 0's disk cache of a PipelineModel: the DiskPrefixCache interface the prefix cache
    uses (block, restore, save_cache, close, stats), over every rank's part."""

    def __init__(self, pipe, local):
        self.pipe, self.local, self.block = pipe, local, local.block
        self._pins = itertools.count(1)
        self.short_hits = 0  # hits cut shorter than rank 0's own prefix by another rank

    def _remote_ranks(self) -> list[int]:
        return list(range(1, len(self.pipe.layers)))

    def _unpin(self, pin: int) -> None:
        for r in self._remote_ranks():
            self.pipe.log.add(r, ["disk_unpin", pin])

    def _lookup(self, tokens, beyond: int, limit: int | None):
        """The OP_DISK round trip: (pin, n tokens every rank holds in memory under the pin, rank
        0's blocks of them joined per layer), or None on a miss (counted; any pins dropped)."""
        from .pipeline import OP_DISK

        disk, block = self.local, self.block
        parts = disk.read_blocks(tokens, beyond, limit)
        if not parts:
            disk.misses += 1
            return None
        pin, n0 = next(self._pins), len(parts)
        ask = {"pin": pin, "tokens": [int(t) for t in tokens[:n0 * block]], "n": n0}
        k = min(n0, int(json.loads(self.pipe.ask(OP_DISK, json.dumps(ask).encode()))["n"]))
        if k < n0:
            self.short_hits += 1
        if k * block <= beyond:
            self._unpin(pin)
            disk.misses += 1
            return None
        disk.hits += 1
        disk.loaded_tokens += k * block
        return pin, k * block, disk.join(parts[:k])

    def restore(self, tokens, beyond: int = 0, limit: int | None = None, copies: int = 1):
        import mlx.core as mx

        from k2mlx.mlxlm_adapter import kv_cache_holding

        found = self._lookup(tokens, beyond, limit)
        if found is None:
            return 0, []
        pin, n, local = found
        a0, b0 = self.pipe.layers[0]
        loads: dict[int, list] = {r: [] for r in self._remote_ranks()}
        out = []
        for _ in range(copies):
            cache = []
            for i in range(self.pipe.num_layers):
                if a0 <= i < b0:
                    cache.append(kv_cache_holding(*local[i - a0]))
                else:
                    z = mx.zeros((1, 1, n, 0))  # the shadow: exact offsets, no data
                    rc = RemoteCache(kv_cache_holding(z, z), self.pipe._owner(i), self.pipe.log)
                    loads[rc._rank].append([rc._oid, i])
                    cache.append(rc)
            out.append(cache)
        for r, entries in loads.items():  # logged before any op of these caches can be
            self.pipe.log.add(r, ["disk_load", pin, n, entries])
        return n, out

    def save_cache(self, tokens, cache) -> int:
        a0, b0 = self.pipe.layers[0]
        if len(cache) != self.pipe.num_layers or len(tokens) < self.block:
            return 0
        by_rank: dict[int, list[int]] = {}
        for c in cache[:a0] + cache[b0:]:
            if not isinstance(c, RemoteCache):
                return 0
            by_rank.setdefault(c._rank, []).append(c._oid)
        kv = kv_arrays(cache[a0:b0])
        if kv is None:
            return 0
        toks = [int(t) for t in tokens]
        for r, oids in by_rank.items():
            self.pipe.log.add(r, ["disk_save", toks, oids])
        # sent now, not with the next forward (an idle server may be stopped before one comes);
        # not waited for: its empty answer is collected in order with the next step's
        self.pipe.flush_ops(wait=False)
        return self.local.save(toks, kv)

    def close(self, timeout: float = 60.0) -> None:
        """Send the queued save ops before the pipeline stops (the workers write, then exit)."""
        try:
            if self.pipe.log.ops and not self.pipe.closed:
                self.pipe.flush_ops()
        except Exception:  # a lost rank: its blocks are not saved; rank 0's still are
            log.exception("prompt cache: could not send the last save ops to the other ranks")
        self.local.close(timeout)

    def flush(self, timeout: float = 60.0) -> None:
        self.local.flush(timeout)

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def stats(self) -> dict:
        return {**self.local.stats(), "ranks": len(self.pipe.layers), "short_hits": self.short_hits}


class WorkerDisk:
    """A worker's part: its DiskPrefixCache (or None: it then never has a block) and its pins."""

    def __init__(self, disk):
        self.disk = disk
        self.pins: dict[int, list] = {}

    def answer(self, payload: bytes) -> bytes:
        count, msg = 0, {"n": 0}
        try:
            msg = json.loads(payload)
            pin, n, tokens = int(msg["pin"]), int(msg["n"]), [int(t) for t in msg["tokens"]]
            if self.disk is not None and n > 0 and len(tokens) >= n * self.disk.block:
                parts = self.disk.read_blocks(tokens[:n * self.disk.block])
                if parts:
                    self.pins[pin] = parts
                count = len(parts)
                msg["tokens"] = tokens[:count * self.disk.block]  # all the next rank may look at
        except (KeyError, TypeError, ValueError):
            log.warning("prompt cache: malformed lookup from rank 0 (answered 0 blocks)", exc_info=True)
        except Exception:  # e.g. out of memory reading: no hit, the caches stay in step
            log.exception("prompt cache: lookup failed (answered 0 blocks)")
        if not isinstance(msg, dict):
            msg = {}
        msg["n"] = count  # count <= the n asked for (its blocks are read at most that far)
        return json.dumps(msg).encode()

    def apply(self, op: list, objects: dict) -> None:
        from k2mlx.mlxlm_adapter import kv_cache_holding, kv_of

        kind = op[0]
        if kind == "disk_unpin":
            self.pins.pop(op[1], None)
        elif kind == "disk_load":
            _, pin, n, entries = op
            parts = self.pins.pop(pin, None)
            if parts is None or self.disk is None or len(parts) * self.disk.block < n:
                raise RuntimeError(f"prompt cache: rank 0 installs pin {pin} ({n} tokens), which this rank "
                                   "does not hold: the caches would differ")
            kv = self.disk.join(parts[:n // self.disk.block])
            a = self.disk.layers[0]
            for oid, layer in entries:
                objects[oid] = kv_cache_holding(*kv[layer - a])
        elif kind == "disk_save":
            if self.disk is None:
                return
            _, tokens, oids = op
            kv = [kv_of(objects[o]) if o in objects else None for o in oids]
            if len(kv) != len(self.disk.layers) or any(x is None for x in kv):
                log.warning("prompt cache: save of %d tokens skipped (its caches are not plain KV caches "
                            "of this rank's %d layers)", len(tokens), len(self.disk.layers))
                return
            try:
                self.disk.save(tokens, kv)
            except Exception:  # this rank just has fewer blocks: later hits are shorter, not wrong
                log.exception("prompt cache: saving %d tokens failed", len(tokens))
        else:
            log.warning("ignoring unknown cache op %r", kind)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


def answer(worker_disk: WorkerDisk | None, payload: bytes) -> bytes:
    """A worker's reply to OP_DISK (pipeline.worker_loop); a rank without a cache has 0 blocks."""
    return (worker_disk or WorkerDisk(None)).answer(payload)


def open_worker_disk(spec, rank: int, model) -> WorkerDisk | None:
    """The worker's part for this cluster's settings, or None when the cache is off."""
    settings = cache_settings(spec.role_args)
    if settings is None:
        return None
    path = spec.model_paths[rank] if spec.model_paths else spec.model
    try:
        return WorkerDisk(open_stage_cache(model, path, settings, tensor_tag(spec, rank)))
    except OSError:
        log.exception("rank %d: cannot use the prompt cache folder %s; running without (no disk hits)",
                      rank, settings["dir"] or "(default)")
        return WorkerDisk(None)


def open_for_cluster(pipe, path, directory, max_gb: float, block: int = 256):
    """Rank 0's disk cache for a PipelineModel or a TensorModel (None for any other model)."""
    from .pipeline import PipelineModel
    from .tensor import TensorModel

    kind = {PipelineModel: PipelineDiskCache, TensorModel: TensorDiskCache}.get(type(pipe))
    if kind is None:
        return None
    tag = tensor_tag(pipe.link.spec, 0)
    return kind(pipe, open_stage_cache(pipe.model, path, {"dir": directory, "gb": max_gb, "block": block}, tag))


class TensorDiskCache(PipelineDiskCache):
    """Rank 0's disk cache of a TensorModel: whole blocks on every rank (see the module docstring)."""

    def _remote_ranks(self) -> list[int]:
        from .tensor import ALL

        return [ALL]  # one op list that every worker replays

    def restore(self, tokens, beyond: int = 0, limit: int | None = None, copies: int = 1):
        from k2mlx.mlxlm_adapter import kv_cache_holding

        from .tensor import ALL, MirrorCache

        found = self._lookup(tokens, beyond, limit)
        if found is None:
            return 0, []
        pin, n, kv = found
        entries, out = [], []
        for _ in range(copies):
            # no "new" op: the workers' "disk_load" below creates each cache from its own blocks
            cache = [MirrorCache(kv_cache_holding(*kv[i]), ALL, self.pipe.log) for i in range(len(kv))]
            entries += [[c._oid, i] for i, c in enumerate(cache)]
            out.append(cache)
        self.pipe.log.add(ALL, ["disk_load", pin, n, entries])  # before any op of these caches
        return n, out

    def save_cache(self, tokens, cache) -> int:
        from .tensor import ALL, MirrorCache

        if len(tokens) < self.block or not all(isinstance(c, MirrorCache) for c in cache):
            return 0
        kv = kv_arrays([c._shadow for c in cache])
        if kv is None or len(kv) != len(self.local.layers):
            return 0
        toks = [int(t) for t in tokens]
        self.pipe.log.add(ALL, ["disk_save", toks, [c._oid for c in cache]])
        self.pipe.flush_ops()  # sent now: an idle server may be stopped before the next forward
        return self.local.save(toks, kv)

    def stats(self) -> dict:
        return {**self.local.stats(), "ranks": self.pipe.link.size, "short_hits": self.short_hits}
