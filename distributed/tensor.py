"""Tensor parallelism: every rank holds 1/N of every layer; rank 0's engine drives all in lock step.

What each rank holds (`shard_model`, applied once at load)
- Attention: heads [r*H/N, (r+1)*H/N). q_b_proj (or q_proj) and kv_b_proj keep their rows of
  those heads (or embed_q / unembed_out their heads), o_proj the matching input columns. MLA's
  latent projections (q_a_proj, kv_a_proj_with_mqa and their norms) are replicated: every rank
  computes the same latent, so the latent KV cache is REPLICATED (kv_lora_rank + rope values per
  token and layer: K2 ~1.1 KB/token/layer at bf16; splitting it would need a gather per layer).
- Routed experts: every expert's intermediate dimension is split (gate/up rows, down columns),
  so each rank reads an equal share of each token's k experts (owning E/N whole experts would
  make the rank with more of a token's experts set the pace). The router is replicated.
- Dense MLP and shared expert: the same intermediate split.
- Embeddings and lm_head: replicated. K2's are 2 x 163840 x 7168 (0.6 GB each at 4-bit, ~0.2% of
  the weights): sharding them by vocabulary saves 0.6 GB per rank but adds a gather of logits
  (and an all-reduce of the embedding) to every token.
- Collectives: one all_sum after attention (o_proj's partial sums) and one after the MLP (the
  experts' + shared expert's partial sums) per layer: 2 x num_layers per forward (K2: 122).

Lock step (`TensorModel` on rank 0, `worker_loop` on the others)
Per forward, every worker gets the step's header, the queued cache operations (JSON, as the
pipeline does: `remote_cache`) and the tokens [B, L] int32; then all ranks run the same
forward and meet in the all_sums. Rank 0's caches are real caches behind `MirrorCache`
stand-ins, whose mutating calls (merge, filter, extend, trim, copy, free ...) are applied at once
and queued for the workers, so every rank's caches see the same calls in the same order.
Each forward is evaluated before it returns, so no rank can leave an all_sum behind.

Wire (rank 0 -> rank 1 -> ... -> rank N-1, each passing the step on before computing, as MLX's
ring backend sends only to neighbours): meta int32[8] = op, payload bytes, B, L, 0, step, 0, 0;
payload uint8[n] (JSON {"ops": ..., "ids": [...] | null}); tokens int32 [B, L] (B > 0).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from k2mlx.errors import ClusterError, ConfigError

from .pipeline import OP_DISK, OP_FORWARD, OP_STATS, OP_STOP, Timeline
from .remote_cache import OpLog, RemoteCache, apply_ops

log = logging.getLogger("k2mlx.distributed.tensor")

ALL = -1  # cache ops for every worker (OpLog is keyed by owning rank in the pipeline)


# ---- the sharded model --------------------------------------------------------------------------
class AllSum(nn.Module):
    """`inner`'s output summed over the group: the one reduction of a row-split product."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_group", group)  # not a parameter

    def __call__(self, *args, **kwargs) -> mx.array:
        return mx.distributed.all_sum(self.inner(*args, **kwargs), group=self._group)


def _is_quantized(mod) -> bool:
    return "scales" in mod and hasattr(mod, "bits")


def _take(a: mx.array, axis: int, start: int, stop: int) -> mx.array:
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, stop)
    return mx.contiguous(a[tuple(idx)])


def _rows(mod, start: int, stop: int) -> None:
    """Keep output features [start, stop) of a Linear / QuantizedLinear / Switch* module."""
    for name in ("weight", "scales", "biases"):
        if mod.get(name) is not None:
            mod[name] = _take(mod[name], -2, start, stop)
    if mod.get("bias") is not None:
        mod["bias"] = _take(mod["bias"], -1, start, stop)


def _cols(mod, start: int, stop: int, rank: int) -> None:
    """Keep input features [start, stop); a bias is added once (on rank 0)."""
    if _is_quantized(mod):
        gs, bits = mod.group_size, mod.bits
        if start % gs or stop % gs or (start * bits) % 32:
            raise ConfigError(f"tensor parallelism: a slice of {stop - start} input features does not "
                              f"fall on {gs}-wide quantization groups; use fewer ranks")
        mod["weight"] = _take(mod["weight"], -1, start * bits // 32, stop * bits // 32)
        for name in ("scales", "biases"):
            if mod.get(name) is not None:
                mod[name] = _take(mod[name], -1, start // gs, stop // gs)
    else:
        mod["weight"] = _take(mod["weight"], -1, start, stop)
    if mod.get("bias") is not None and rank != 0:
        mod["bias"] = mx.zeros_like(mod["bias"])


def _heads(mod, start: int, stop: int) -> None:
    """PerHeadLinear / QuantizedPerHeadLinear: weight [H, out, in] -> heads [start, stop)."""
    for name in ("weight", "scales", "biases"):
        if mod.get(name) is not None:
            mod[name] = _take(mod[name], 0, start, stop)


def _split(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if total % size:
        raise ConfigError(f"tensor parallelism over {size} ranks needs {what} ({total}) divisible by {size}")
    n = total // size
    return rank * n, (rank + 1) * n


def _shard_mlp(mlp, rank: int, size: int) -> None:
    """SwiGLU (dense MLP, shared expert, or the stacked routed experts): intermediate split."""
    inter = mlp.gate_proj.weight.shape[-2]
    a, b = _split(inter, rank, size, "the intermediate size")
    _rows(mlp.gate_proj, a, b)
    _rows(mlp.up_proj, a, b)
    _cols(mlp.down_proj, a, b, rank)


def _shard_attention(attn, rank: int, size: int) -> None:
    H = attn.num_heads
    h0, h1 = _split(H, rank, size, "the number of attention heads")
    q = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    _rows(q, h0 * attn.q_head_dim, h1 * attn.q_head_dim)
    if attn.weights_layout == "split":
        _heads(attn.embed_q, h0, h1)
        _heads(attn.unembed_out, h0, h1)
    else:
        per = attn.qk_nope_head_dim + attn.v_head_dim
        _rows(attn.kv_b_proj, h0 * per, h1 * per)
    _cols(attn.o_proj, h0 * attn.v_head_dim, h1 * attn.v_head_dim, rank)
    attn.num_heads = h1 - h0


def shard_model(model, rank: int, size: int, group, materialize: bool = True, wrap: bool = True) -> None:
    """Keep this rank's 1/N of every owned layer (in place) and add the two all_sums per layer.
    Decided once at load; the forward pass itself is the unchanged model code.
    `materialize=False` leaves lazy arrays lazy (`k2mlx plan` sizes a rank without weights);
    `wrap=False` slices only (the slice loader fills the weights first, then `add_all_sums`)."""
    if size == 1:
        return
    for layer in model.layers:
        _shard_attention(layer.self_attn, rank, size)
        mlp = layer.mlp
        if "switch_mlp" in mlp:
            _shard_mlp(mlp.switch_mlp, rank, size)
            if "shared_experts" in mlp:
                _shard_mlp(mlp.shared_experts, rank, size)
        else:
            _shard_mlp(mlp, rank, size)
    if wrap:
        add_all_sums(model, group)
    if materialize:
        mx.eval(model.parameters())


def add_all_sums(model, group) -> None:
    """The two reductions per layer: after attention's o_proj and after the MLP."""
    for layer in model.layers:
        layer.self_attn.o_proj = AllSum(layer.self_attn.o_proj, group)
        layer.mlp = AllSum(layer.mlp, group)


# ---- rank 0: the model the engine drives --------------------------------------------------------
class MirrorCache(RemoteCache):
    """A real cache on rank 0 whose mutating calls are also queued for every worker (see
    remote_cache). The forward itself runs on the real cache (`update_and_fetch` is never
    forwarded: every rank does its own in its forward)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name == "update_and_fetch":
            return getattr(self._shadow, name)
        return RemoteCache.__getattr__(self, name)


def _real(c):
    return c._shadow if isinstance(c, RemoteCache) else c


class TensorModel:
    """Rank 0's model-like view: `__call__(tokens, cache)`, `make_cache()`, like the local model."""

    stages = 1  # nothing to overlap: every rank works on every step

    def __init__(self, model, link):
        self.model, self.link = model, link
        self.args = getattr(model, "args", None)
        self.log = OpLog()
        self.timeline = Timeline(0)
        self._step = 0
        self.closed = False

    @property
    def layer_range(self) -> range:
        return self.model.layer_range

    def make_cache(self) -> list:
        return [MirrorCache.new(c, ALL, i, self.log) for i, c in enumerate(self.model.make_cache())]

    def _send(self, op: int, B: int, L: int, ids, tokens: mx.array | None = None) -> None:
        """The step to rank 1; each worker passes it on round the ring (MLX's ring backend
        sends only to neighbours), the last one back to rank 0 only for stats."""
        payload = json.dumps({"ops": self.log.take(), "ids": ids}).encode() if op == OP_FORWARD else b""
        self._step += 1
        self.link.send_meta([op, len(payload), B, L, 0, self._step, 0, 0], payload, self.link.next)
        if tokens is not None:
            self.link.send(tokens, self.link.next)

    def __call__(self, tokens: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        if self.closed:
            raise ClusterError("the tensor-parallel group was shut down")
        t0, c0 = time.perf_counter(), time.process_time()
        B, L = tokens.shape
        tokens = tokens.astype(mx.int32)
        ids = [c._oid for c in cache] if cache is not None else None
        self._send(OP_FORWARD, B, L, ids, tokens)
        real = [_real(c) for c in cache] if cache is not None else None
        h = self.model.forward_layers(self.model.embed(tokens), real, mask)  # [B, L, hidden]
        _eval(h, self.link)  # every all_sum of this step, now (see the module docstring)
        self.timeline.steps.append((self._step, 0.0, time.perf_counter() - t0, time.process_time() - c0))
        return self.model.head(h)  # [B, L, vocab], replicated head: local

    def flush_ops(self, wait: bool = True) -> None:
        """Send queued cache ops (e.g. frees) without a forward. No rank answers one, so there
        is nothing to wait for (`wait` is the pipeline's signature)."""
        self._send(OP_FORWARD, 0, 0, None)

    def ask(self, op: int, payload: bytes = b"") -> bytes:
        """One synchronous trip of `payload` round the ring (the disk prompt cache's lookup:
        each worker answers by passing on its version; disk_pipeline.py)."""
        self._step += 1
        return self.link.round_trip(op, self._step, payload, "tensor group")

    def stats(self) -> list[dict]:
        """Every rank's step records, gathered round the ring."""
        payload = self.ask(OP_STATS)
        return [{"rank": 0, "steps": list(self.timeline.steps)}] + json.loads(payload or b"[]")

    def close(self) -> None:
        if not self.closed:
            self._send(OP_STOP, 0, 0, None)
            self.closed = True


def _eval(x: mx.array, link) -> None:
    try:
        mx.eval(x)
    except RuntimeError as e:  # a peer's sockets closed inside an all_sum
        raise link._fail(e, 0 if link.rank else 1) from None


# ---- ranks 1..N-1 -------------------------------------------------------------------------------
def worker_loop(model, link, disk=None) -> None:
    """Follow rank 0's steps until OP_STOP: replay cache ops, run the same forward. disk: this
    rank's disk prompt cache (a disk_pipeline.WorkerDisk holding every layer) or None."""
    objects: dict[int, Any] = {}
    timeline = Timeline(link.rank)

    def make_layer_cache(layer: int):
        return model.make_cache()[layer]  # fresh objects each time: caches are mutable

    last = link.next == 0
    while True:
        t0 = time.perf_counter()
        meta, payload = link.recv_meta(link.prev)
        op, _, B, L, _, step = meta[:6]
        if op == OP_STATS:  # append ours and pass on; the last rank's list goes back to rank 0
            got = json.loads(payload or b"[]") if link.prev != 0 else []
            got.append({"rank": link.rank, "steps": list(timeline.steps)})
            data = json.dumps(got).encode()
            link.send_meta([OP_STATS, len(data), 0, 0, 0, step], data, link.next)
            continue
        if op == OP_DISK:  # answer and pass on; the last rank's answer goes back to rank 0
            from .disk_pipeline import answer

            data = answer(disk, payload)
            link.send_meta([OP_DISK, len(data), 0, 0, 0, step], data, link.next)
            continue
        if not last:
            link.send_meta(meta, payload, link.next)
        if op == OP_STOP:
            return
        msg = json.loads(payload)
        mine = msg["ops"].get(str(ALL), [])
        if mine:
            apply_ops(mine, objects, make_layer_cache, disk.apply if disk is not None else None)
        if B == 0:
            continue
        tokens = link.recv((B, L), mx.int32, link.prev)
        if not last:
            link.send(tokens, link.next)
        t1, c1 = time.perf_counter(), time.process_time()
        ids = msg["ids"]
        cache = [objects[i] for i in ids] if ids is not None else None
        h = model.forward_layers(model.embed(tokens), cache)
        _eval(h, link)
        timeline.steps.append((step, t1 - t0, time.perf_counter() - t1, time.process_time() - c1))
