"""Pipeline-parallel forward passes over `mx.distributed` (rank 0 drives, the others follow).

Rank r owns the contiguous layers `spec.layers[r]` (rank 0 also embeds, the last rank also runs
the final norm + lm_head). One step travels the ring 0 -> 1 -> ... -> N-1 -> 0:

    meta  int32[8]   op, payload bytes, B, L, dtype code, step id, flags, last step rank 0 collected
    payload uint8[n] JSON: cache ops for each rank, the cache ids of this step   (when n > 0)
    hidden [B, L, hidden]                                                          (FORWARD)
  last rank -> rank 0:
    meta  int32[8]   op, 0, B, L_out, vocab, dtype code, step id, 0
    logits [B, L_out, vocab]

Rank 0 exposes `PipelineModel`: `__call__(tokens, cache)` and `make_cache()` like the local model,
so the engine runs unchanged. For overlap it also has a two-phase API: `submit(tokens, cache)`
runs rank 0's own layers, sends the hidden state on and returns a `PendingStep` at once;
`PendingStep.result()` waits for the logits. With two micro-batches A and B in flight the engine
does `pa = submit(A); pb = submit(B); la = pa.result(); ...; pa = submit(A'); lb = pb.result()`,
so while the last stage works on A, rank 0 already computes B. Results come back in submit order.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from k2mlx.errors import ClusterError

from .remote_cache import OpLog, RemoteCache, apply_ops

OP_FORWARD, OP_STOP, OP_STATS, OP_DISK = 1, 2, 3, 4
FLAG_LAST_ONLY = 1
log = logging.getLogger("k2mlx.distributed.pipeline")
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def _code(dtype) -> int:
    return DTYPES.index(dtype)


class Link:
    """send/recv with MLX errors turned into a ClusterError naming the peer."""

    def __init__(self, group, spec, health=None):
        self.group, self.spec, self.health = group, spec, health
        self.rank, self.size = group.rank(), group.size()
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size
        self.bell_in = self.bell_out = None

    def open_bells(self, timeout: float = 60.0) -> None:
        """Doorbells: one byte on a plain TCP socket per message, read before MLX's recv.

        Why: a rank waiting inside MLX's ring recv polls (measured: about a quarter of a core),
        which steals CPU from the computing rank when both share a machine or the CPU does the
        math. Blocking in the kernel on a doorbell costs nothing while waiting."""
        ports = getattr(self.spec, "bell_ports", None)
        if not ports or self.size == 1:
            return
        me, nxt = self.spec.host(self.rank), self.spec.host(self.next)
        srv = socket.create_server((me.address if me.address != "localhost" else "127.0.0.1",
                                    ports[self.rank]))
        srv.settimeout(0.1)
        out = inn = None
        end = time.monotonic() + timeout
        while out is None or inn is None:
            if out is None:
                try:
                    out = socket.create_connection((nxt.address, ports[self.next]), timeout=1.0)
                except OSError:
                    time.sleep(0.05)
            if inn is None:
                try:
                    inn, _ = srv.accept()
                except (socket.timeout, BlockingIOError):
                    pass
            if time.monotonic() > end:
                raise ClusterError("doorbell connection not made", host=str(nxt), rank=self.next)
        srv.close()
        for sk in (out, inn):
            sk.settimeout(None)
            sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bell_out, self.bell_in = out, inn

    def _fail(self, e: Exception, peer: int) -> ClusterError:
        log.error("rank %d: send/recv with rank %d failed", self.rank, peer, exc_info=e)
        # The peer's sockets closed. The health thread names the real culprit (in a longer
        # pipeline the dead rank may not be our neighbour); give it a moment to decide.
        if self.health is not None:
            self.health.failed.wait(self.spec.deadline_s + 1.0)
            if self.health.error is not None:
                return self.health.error
        return ClusterError(f"link lost: {e}", host=str(self.spec.host(peer)), rank=peer)

    def send(self, x: mx.array, dst: int) -> None:
        try:
            mx.eval(mx.distributed.send(x, dst, group=self.group))
            if self.bell_out is not None:
                self.bell_out.sendall(b"\x01")
        except (RuntimeError, OSError) as e:
            raise self._fail(e, dst) from None

    def recv(self, shape, dtype, src: int) -> mx.array:
        try:
            if self.bell_in is not None and not self.bell_in.recv(1):
                raise RuntimeError("doorbell closed")
            y = mx.distributed.recv(shape, dtype, src, group=self.group)
            mx.eval(y)
            return y
        except (RuntimeError, OSError) as e:
            raise self._fail(e, src) from None

    def send_meta(self, meta: list[int], payload: bytes, dst: int) -> None:
        self.send(mx.array(meta + [0] * (8 - len(meta)), dtype=mx.int32), dst)
        if payload:
            self.send(mx.array(list(payload), dtype=mx.uint8), dst)

    def recv_meta(self, src: int) -> tuple[list[int], bytes]:
        meta = self.recv((8,), mx.int32, src).tolist()
        payload = b""
        if meta[1] > 0:
            payload = bytes(self.recv((meta[1],), mx.uint8, src).tolist())
        return meta, payload

    def round_trip(self, op: int, step: int, payload: bytes, what: str) -> bytes:
        """Rank 0: `payload` once round the ring (each worker answers by passing on its version),
        and the answer the last rank sends back; a reply to another op or step is a ClusterError."""
        self.send_meta([op, len(payload), 0, 0, 0, step], payload, self.next)
        meta, answer = self.recv_meta(self.prev)
        if meta[0] != op or meta[5] != step:
            raise ClusterError(f"{what} out of order: got op {meta[0]} step {meta[5]}, expected op {op} "
                               f"step {step}", host=str(self.spec.host(self.prev)), rank=self.prev)
        return answer


@dataclass
class PendingStep:
    pipe: "PipelineModel"
    step: int
    shape: tuple[int, int]
    last_only: bool
    logits: mx.array | None = None

    def result(self) -> mx.array:
        """Logits [B, L, vocab] (or [B, 1, vocab] with last_only) of this step."""
        while self.logits is None:
            self.pipe._collect_one()
        return self.logits


@dataclass
class Timeline:
    """Per step on one rank: seconds waiting for input, seconds computing (incl. send) and the
    process CPU seconds of that computing (what other load on a shared machine cannot inflate)."""

    rank: int
    # (step, wait_s, compute_s, compute_cpu_s); bounded so a long-running server does not grow it forever
    steps: deque = field(default_factory=lambda: deque(maxlen=8192))
    # workers: (step, last step rank 0 had collected when it sent this one). A gap of more than
    # one means this step reached us while an earlier step's logits were still on their way:
    # the stages overlapped (a record of the wire, not of timing)
    seen: deque = field(default_factory=lambda: deque(maxlen=8192))


class PipelineModel:
    """Rank 0's model-like view of the whole pipeline."""

    def __init__(self, model, link: Link, num_layers: int, full_logits: bool = False):
        self.model, self.link = model, link
        self.num_layers = num_layers
        self.layers = list(link.spec.layers)
        self.full_logits = full_logits
        self.log = OpLog()
        self._step = 0
        self._collected = 0  # last step whose logits came back
        self.max_inflight = 0  # most steps submitted and not yet collected at one time
        self._inflight: list[PendingStep] = []
        self.timeline = Timeline(0)
        self.closed = False
        self.args = getattr(model, "args", None)

    @property
    def stages(self) -> int:
        """Pipeline depth: the engine keeps this many micro-batch groups in flight."""
        return len(self.layers)

    @property
    def layer_range(self) -> range:
        return range(0, self.num_layers)

    def _owner(self, layer: int) -> int:
        for r, (a, b) in enumerate(self.layers):
            if a <= layer < b:
                return r
        raise ValueError(f"layer {layer} belongs to no rank")

    def make_cache(self) -> list:
        from k2mlx.mlxlm_adapter import KVCache

        local = self.model.make_cache()
        a0, b0 = self.layers[0]
        out = []
        for i in range(self.num_layers):
            if a0 <= i < b0:
                out.append(local[i - a0])
            else:
                out.append(RemoteCache.new(KVCache(), self._owner(i), i, self.log))
        return out

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        return self.submit(tokens, cache).result()

    def submit(self, tokens: mx.array, cache: list | None = None,
               last_only: bool | None = None) -> PendingStep:
        """Run rank 0's layers on tokens [B, L] and send the hidden state on; do not wait."""
        if self.closed:
            raise ClusterError("the pipeline was shut down")
        B, L = tokens.shape
        if last_only is None:
            # Prefill logits cross the network ([B, L, vocab] float32: 335 MB for a 512-token
            # K2 chunk) and engines read only the last position (mlx-lm's BatchGenerator
            # discards them), so by default only the last position is computed and sent back.
            last_only = not self.full_logits and L > 1
        t0, c0 = time.perf_counter(), time.process_time()
        a0, b0 = self.layers[0]
        local = cache[a0:b0] if cache is not None else None
        ids: dict[int, list[int]] = {}
        shadows: list = []
        if cache is not None:
            for i, c in enumerate(cache):
                if isinstance(c, RemoteCache):
                    ids.setdefault(c._rank, []).append(c._oid)
                    c._advance(B, L)
                    shadows.append(c._shadow)
        if shadows:  # zero-size arrays: evaluating them is free and keeps their graphs short
            mx.eval([a for sh in shadows for a in vars(sh).values() if isinstance(a, mx.array)])
        payload = json.dumps({"ops": self.log.take(), "ids": ids}).encode()
        self._step += 1
        flags = FLAG_LAST_ONLY if last_only else 0
        h = self.model.embed(tokens)                      # [B, L, hidden]
        if b0 > a0:
            h = self.model.forward_layers(h, local)       # [B, L, hidden]
        self.link.send_meta([OP_FORWARD, len(payload), B, L, _code(h.dtype), self._step, flags,
                             self._collected], payload, self.link.next)
        self.link.send(h, self.link.next)
        pending = PendingStep(self, self._step, (B, L), last_only)
        self._inflight.append(pending)
        self.max_inflight = max(self.max_inflight, len(self._inflight))
        self.timeline.steps.append((self._step, 0.0, time.perf_counter() - t0, time.process_time() - c0))
        return pending

    def _collect_one(self) -> None:
        pending = self._inflight[0]
        t0 = time.perf_counter()
        meta, _ = self.link.recv_meta(self.link.prev)
        B, Lo, V, code, step = meta[2:7]
        if step != pending.step:
            raise ClusterError(f"pipeline out of order: got step {step}, expected {pending.step}",
                               host=str(self.link.spec.host(self.link.prev)), rank=self.link.prev)
        if B == 0:  # an ops-only step has no logits
            pending.logits = mx.zeros((0, 0, 0))
        else:
            pending.logits = self.link.recv((B, Lo, V), DTYPES[code], self.link.prev)
        self._inflight.pop(0)
        self._collected = step
        self.timeline.steps.append((step, time.perf_counter() - t0, 0.0, 0.0))

    def flush_ops(self, wait: bool = True) -> None:
        """Send queued cache ops now (e.g. frees of finished sequences) without a forward.
        wait=False: its (empty) answer is collected in order with the next step's."""
        payload = json.dumps({"ops": self.log.take(), "ids": {}}).encode()
        self._step += 1
        self.link.send_meta([OP_FORWARD, len(payload), 0, 0, 0, self._step, 0, self._collected],
                            payload, self.link.next)
        pending = PendingStep(self, self._step, (0, 0), True)
        self._inflight.append(pending)
        if wait:
            pending.result()

    def ask(self, op: int, payload: bytes = b"") -> bytes:
        """One synchronous trip of `payload` round the ring (each worker answers by passing on
        its version), after every step in flight has come back."""
        for p in list(self._inflight):
            p.result()
        self._step += 1
        return self.link.round_trip(op, self._step, payload, "pipeline")

    def stats(self) -> list[dict]:
        """Every rank's timeline (collected through the pipeline, in rank order)."""
        others = json.loads(self.ask(OP_STATS) or b"[]")
        return [{"rank": 0, "steps": list(self.timeline.steps), "max_inflight": self.max_inflight}] + others

    def close(self) -> None:
        """Tell every worker to exit its loop (orderly shutdown)."""
        if self.closed:
            return
        for p in list(self._inflight):
            p.result()
        self.link.send_meta([OP_STOP, 0], b"", self.link.next)
        self.closed = True


def worker_loop(model, link: Link, disk=None) -> None:
    """Ranks 1..N-1: follow rank 0's steps until OP_STOP. disk: this rank's part of the disk
    prompt cache (a disk_pipeline.WorkerDisk) or None."""
    rank, last = link.rank, link.rank == link.size - 1
    a, b = link.spec.layers[rank]
    objects: dict[int, Any] = {}
    template = None

    def make_layer_cache(layer: int):
        nonlocal template
        template = model.make_cache()  # fresh objects each time: caches are mutable
        return template[layer - a]

    timeline = Timeline(rank)
    while True:
        t0 = time.perf_counter()
        meta, payload = link.recv_meta(link.prev)
        t1 = time.perf_counter()
        op, _, B, L, code, step, flags = meta[:7]
        if op == OP_STOP:
            if not last:
                link.send_meta(meta, b"", link.next)
            return
        if op == OP_STATS:
            got = json.loads(payload or b"[]")
            got.append({"rank": rank, "steps": list(timeline.steps), "seen": list(timeline.seen)})
            data = json.dumps(got).encode()
            link.send_meta([OP_STATS, len(data), 0, 0, 0, step], data, link.next)
            continue
        if op == OP_DISK:
            from .disk_pipeline import answer

            data = answer(disk, payload)
            link.send_meta([OP_DISK, len(data), 0, 0, 0, step], data, link.next)
            continue
        timeline.seen.append((step, meta[7]))
        msg = json.loads(payload)
        mine = msg["ops"].get(str(rank), [])
        if mine:
            apply_ops(mine, objects, make_layer_cache, disk.apply if disk is not None else None)
        if not last:  # let the next rank replay its ops while we compute
            link.send_meta(meta, payload, link.next)
        if B == 0:  # ops only
            if last:
                link.send_meta([0, 0, 0, 0, 0, 0, step], b"", link.next)
            continue
        h = link.recv((B, L, model_hidden(model)), DTYPES[code], link.prev)
        t2, c2 = time.perf_counter(), time.process_time()
        ids = msg["ids"].get(str(rank))
        cache = [objects[i] for i in ids] if ids is not None else None
        h = model.forward_layers(h, cache)                # [B, L, hidden]
        if last:
            if flags & FLAG_LAST_ONLY:
                h = h[:, -1:, :]                          # [B, 1, hidden]
            logits = model.head(h)                        # [B, L_out, vocab]
            mx.eval(logits)
            link.send_meta([OP_FORWARD, 0, B, logits.shape[1], logits.shape[2],
                            _code(logits.dtype), step], b"", link.next)
            link.send(logits, link.next)
        else:
            link.send(h, link.next)
        timeline.steps.append((step, t2 - t0, time.perf_counter() - t2, time.process_time() - c2))


def model_hidden(model) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "hidden_size"))
