"""Rank 0's stand-ins for the KV caches of layers that live on other ranks.

The engine manipulates caches (merge, extend, filter, extract, trim, prepare, finalize, deepcopy)
as if the whole model were local. For a remote layer it holds a `RemoteCache`: a *shadow* cache
of the same class whose tensors have zero width (so offsets, padding, sizes and return values
are exact and cost nothing), plus an object id. Every mutating call is applied to the shadow at
once and queued as an op; the queue rides in the header of the next pipeline step, and the rank
that owns the layer replays it on the real cache with the same id. Because every rank handles
steps in order, the real cache sees exactly the calls the engine made, in the same order.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any

import mlx.core as mx

# Calls that read but never change a cache: answered by the shadow alone.
PURE = {"is_trimmable", "empty", "size", "make_mask", "keys_and_values", "nbytes", "state",
        "meta_state"}

_ids = itertools.count(1)


class OpLog:
    """Queued cache ops, per owning rank."""

    def __init__(self):
        self.ops: dict[int, list] = {}

    def add(self, rank: int, op: list) -> None:
        self.ops.setdefault(rank, []).append(op)

    def take(self) -> dict[int, list]:
        ops, self.ops = self.ops, {}
        return ops


def _shadow_kv(B: int, L: int) -> tuple[mx.array, mx.array]:
    z = mx.zeros((B, 1, L, 0))  # [B, 1, L, 0]: right shape for offsets, no data
    return z, z


class RemoteCache:
    """Stand-in for one remote layer's cache (see module docstring)."""

    __slots__ = ("_shadow", "_oid", "_rank", "_log", "__weakref__")

    def __init__(self, shadow: Any, rank: int, log: OpLog, oid: int | None = None):
        object.__setattr__(self, "_shadow", shadow)
        object.__setattr__(self, "_oid", oid if oid is not None else next(_ids))
        object.__setattr__(self, "_rank", rank)
        object.__setattr__(self, "_log", log)

    @classmethod
    def new(cls, shadow: Any, rank: int, layer: int, log: OpLog) -> "RemoteCache":
        rc = cls(shadow, rank, log)
        log.add(rank, ["new", rc._oid, layer])
        return rc

    # -- helpers ------------------------------------------------------------------------------
    def _wrap(self, value: Any) -> Any:
        from k2mlx.mlxlm_adapter import is_layer_cache

        if is_layer_cache(value):
            return type(self)(value, self._rank, self._log)  # (tensor.MirrorCache stays one)
        return value

    def _advance(self, B: int, L: int) -> None:
        """Mirror a forward step of L tokens on the shadow."""
        self._shadow.update_and_fetch(*_shadow_kv(B, L))

    # -- proxying -----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._shadow, name)
        if not callable(attr) or name in PURE:
            return attr

        def call(*args, **kwargs):
            res = attr(*_local(args), **_local(kwargs))
            out = self._wrap(res)
            rid = out._oid if isinstance(out, RemoteCache) else None
            self._log.add(self._rank, ["call", self._oid, name, _wire(args), _wire(kwargs), rid])
            return out

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            raise NotImplementedError(
                "setting .state of a cache that lives on another rank is not supported; "
                "use copy.deepcopy(cache) to keep a prefix")
        setattr(self._shadow, name, _local(value))
        self._log.add(self._rank, ["set", self._oid, name, _wire(value)])

    def __deepcopy__(self, memo) -> "RemoteCache":
        dup = type(self)(copy.deepcopy(self._shadow, memo), self._rank, self._log)
        self._log.add(self._rank, ["copy", self._oid, dup._oid])
        return dup

    def __del__(self) -> None:
        try:
            self._log.add(self._rank, ["del", self._oid])
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"RemoteCache(rank={self._rank}, id={self._oid}, {type(self._shadow).__name__})"


def _local(x: Any) -> Any:
    if isinstance(x, RemoteCache):
        return x._shadow
    if isinstance(x, (list, tuple)):
        return type(x)(_local(v) for v in x)
    if isinstance(x, dict):
        return {k: _local(v) for k, v in x.items()}
    return x


def _wire(x: Any) -> Any:
    """JSON form of call arguments: caches by id, arrays by value."""
    if isinstance(x, RemoteCache):
        return {"$oid": x._oid}
    if isinstance(x, mx.array):
        return {"$arr": x.tolist(), "dtype": str(x.dtype).split(".")[-1]}
    if isinstance(x, (list, tuple)):
        return [_wire(v) for v in x]
    if isinstance(x, dict):
        return {k: _wire(v) for k, v in x.items()}
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    raise TypeError(f"cannot forward a {type(x).__name__} argument to a remote cache")


def _unwire(x: Any, objects: dict[int, Any]) -> Any:
    if isinstance(x, dict):
        if "$oid" in x:
            return objects[x["$oid"]]
        if "$arr" in x:
            return mx.array(x["$arr"], dtype=getattr(mx, x["dtype"]))
        return {k: _unwire(v, objects) for k, v in x.items()}
    if isinstance(x, list):
        return [_unwire(v, objects) for v in x]
    return x


def apply_ops(ops: list, objects: dict[int, Any], make_layer_cache, extra=None) -> None:
    """Replay rank 0's cache calls on this rank's real caches (worker side). `extra(op, objects)`
    replays any other kind (the disk prompt cache's ops: disk_pipeline.py)."""
    for op in ops:
        kind = op[0]
        if kind == "new":
            objects[op[1]] = make_layer_cache(op[2])
        elif kind == "del":
            objects.pop(op[1], None)
        elif kind == "copy":
            objects[op[2]] = copy.deepcopy(objects[op[1]])
        elif kind == "set":
            setattr(objects[op[1]], op[2], _unwire(op[3], objects))
        elif kind == "call":
            _, oid, name, args, kwargs, rid = op
            res = getattr(objects[oid], name)(*_unwire(args, objects), **_unwire(kwargs, objects))
            if rid is not None:
                objects[rid] = res
        elif extra is not None:
            extra(op, objects)
