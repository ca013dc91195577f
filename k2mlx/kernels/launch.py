"""Launching the expert-dispatch kernels (Metal, or CUDA through the same bodies), for up to
MAX_KERNEL_TOKENS tokens:
  group    the N*k (token, expert) pairs by expert: order, pos, slots (expert, start, count)
  gate_up  per expert in use: x W_g^T and x W_u^T fused, SwiGLU -> h (expert-grouped rows)
  down     per expert in use: h W_d^T -> y (expert-grouped rows)
  combine  per token, in token order: sum_j w_j y_(token, j) (+ the shared expert)
Each expert's INT4 weights are read once per tile of TT tokens, so once in all for an
expert with <= TT tokens, instead of once per (token, expert) pair. The same launch code
drives the C++ twin ("cpp") on numpy arrays.

This module only runs kernels. Whether a model uses them is decided once at load by
k2mlx.kernels.policy (measured, cached); k2mlx.kernels.dispatch runs the chosen path.
Imports: sources, reference, cpp (leaves); nothing here imports policy, probe or checks.
"""
from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from k2mlx.kernels import cpp
from k2mlx.kernels.reference import Experts
from k2mlx.kernels.sources import SPECS, header, source

MAX_KERNEL_TOKENS = 64
TT = 8  # tokens per tile: an expert's weights are read once per tile
ROWS = 4  # output rows per simdgroup
NSG = 4  # simdgroups per threadgroup in the expert kernels


@lru_cache(maxsize=1)
def gpu_backend() -> str | None:
    """"metal" or "cuda" when MLX runs on one and custom kernels can be used, else None."""
    metal = getattr(mx, "metal", None)
    if metal is not None and metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


@lru_cache(maxsize=None)
def _gpu_kernel(backend: str, name: str):
    spec = SPECS[name]
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(
        name=f"k2mlx_{name}", input_names=list(spec.inputs), output_names=list(spec.outputs),
        source=source(backend, name), header=header(backend),
    )


def launch(backend, name, constants, inputs, out_shapes, out_dtypes, n_tg, tg, t_dtype=None):
    """Runs `n_tg` threadgroups of `tg` threads of one kernel on a backend: "metal"/"cuda"
    (mx arrays in and out) or "cpp" (numpy in and out, the C++ twin)."""
    spec = SPECS[name]
    consts = {k: int(constants[k]) for k in spec.constants}
    if backend == "cpp":
        return cpp.run(name, consts, inputs, out_shapes, out_dtypes, n_tg, tg,
                       t_dtype if t_dtype is not None else np.float32)
    template = ([("T", t_dtype)] if spec.typed else []) + list(consts.items())
    return _gpu_kernel(backend, name)(
        inputs=inputs, template=template, grid=(n_tg * tg, 1, 1), threadgroup=(tg, 1, 1),
        output_shapes=out_shapes, output_dtypes=out_dtypes,
    )


def round32(n: int, cap: int) -> int:
    return max(32, min(cap, (n + 31) // 32 * 32))


def kernel_unsupported(ex: Experts) -> str | None:
    """Why the expert kernels cannot run these weights, or None when they can."""
    if not ex.quantized:
        return "experts are not quantized"
    projs = (ex.gate, ex.up, ex.down)
    if any(p.mode != "affine" or p.biases is None for p in projs):
        return "only affine quantization (with biases) is supported"
    if len({(p.bits, p.group_size) for p in projs}) != 1:
        return "gate, up and down must share bits and group size"
    bits, gs = ex.gate.bits, ex.gate.group_size
    if bits not in (2, 4, 8):
        return f"{bits}-bit weights are not supported (2, 4, 8 are)"
    E, I = ex.gate.weight.shape[:2]
    D = ex.down.weight.shape[1]
    if I % (NSG * ROWS) or D % (NSG * ROWS):
        return f"hidden {D} and expert size {I} must be multiples of {NSG * ROWS}"
    if gs % (32 // bits) or D % gs or I % gs:
        return f"group size {gs} must divide the dimensions"
    return None


def dims(ex: Experts):
    """(E, D, I, group size, bits) of quantized experts."""
    E, I = ex.gate.weight.shape[:2]
    D = ex.down.weight.shape[1]
    return E, D, I, ex.gate.group_size, ex.gate.bits


def expert_constants(ex: Experts, top_k: int) -> dict[str, int]:
    """Compile-time constants of the gate_up / down kernels for these weights."""
    E, D, I, GS, BITS = dims(ex)
    pf = 32 // BITS
    # words per vector load: as many as fit in one quantization group (and the rows)
    wpl = next(w for w in (4, 2, 1) if GS % (w * pf) == 0 and D % (w * pf) == 0 and I % (w * pf) == 0)
    return {"D": D, "I": I, "GS": GS, "BITS": BITS, "TOPK": top_k, "ROWS": ROWS, "TT": TT, "WPL": wpl}


def run_kernels(backend, x2, inds, weights, ex: Experts, shared=None, stages: bool = False):
    """The kernel path on 2-D inputs: x2 [N, D], inds/weights [N, k], shared [N, D] | None
    -> out [N, D] (with `stages`, a dict of every kernel's outputs). backend "metal"/"cuda"
    takes mx arrays, "cpp" numpy arrays (float32, the C++ twin)."""
    E, D, I, GS, BITS = dims(ex)
    N, K = inds.shape
    P = N * K
    if backend == "cpp":
        ints, i32 = (lambda v: np.array(v, np.int32)), np.int32
        flat = np.ascontiguousarray(np.asarray(inds).reshape(-1).astype(np.int32))
        w32 = np.asarray(weights).astype(np.float32)
        arr = np.asarray
    else:
        ints, i32 = (lambda v: mx.array(v, mx.int32)), mx.int32
        flat = inds.reshape(-1).astype(mx.int32)
        w32 = weights.astype(mx.float32)
        arr = lambda a: a  # noqa: E731
    T = x2.dtype
    order, pos, slots = launch(
        backend, "group", {"E": E}, [flat, ints([P])], [(P,), (P,), (P, 3)], [i32, i32, i32],
        n_tg=1, tg=round32(E, 1024),
    )
    c = expert_constants(ex, K)
    g, u, d = ex.gate, ex.up, ex.down
    (h,) = launch(
        backend, "gate_up", c,
        [x2, order, slots] + [arr(t) for t in (g.weight, g.scales, g.biases, u.weight, u.scales, u.biases)],
        [(P, I)], [T], n_tg=P * (I // (NSG * ROWS)), tg=NSG * 32, t_dtype=T,
    )
    (y,) = launch(
        backend, "down", c, [h, slots] + [arr(t) for t in (d.weight, d.scales, d.biases)],
        [(P, D)], [T], n_tg=P * (D // (NSG * ROWS)), tg=NSG * 32, t_dtype=T,
    )
    has_shared = shared is not None
    (out,) = launch(
        backend, "combine", {"D": D, "TOPK": K, "HAS_SHARED": int(has_shared)},
        [y, pos, w32, shared if has_shared else x2, ints([N])], [(N, D)], [T],
        n_tg=(N * D + 255) // 256, tg=256, t_dtype=T,
    )
    if stages:
        return {"order": order, "pos": pos, "slots": slots, "h": h, "y": y, "out": out}
    return out
