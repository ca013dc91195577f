"""Backend checks shared by the tests and `k2mlx selftest`: run each kernel on a backend
("metal", "cuda" or "cpp", the C++ twin) and compare it with the MLX-ops reference.

Cases are small K2-shaped routed experts (affine 4-bit, the MLX layout that
QuantizedSwitchLinear holds) with an expert chosen by every token and one chosen by none.
Imports dispatch, launch, router and reference; only tests, scripts and `k2mlx selftest` import it."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from k2mlx.kernels.dispatch import np_experts
from k2mlx.kernels.launch import run_kernels
from k2mlx.kernels.reference import Experts, Proj, reference_stages, route_reference
from k2mlx.kernels.router import run_router

E, D, I, K = 16, 128, 64, 4
EVERY, NONE = 3, 0  # expert 3 is picked by every token, expert 0 by none


def make_experts(seed=0, bits=4, group_size=32, dtype=mx.float32, quantized=True, dims=(E, D, I)):
    e, d, i = dims
    k = mx.random.split(mx.random.key(seed), 3)
    ws = [
        mx.random.normal((e, i, d), key=k[0]) * 0.1,
        mx.random.normal((e, i, d), key=k[1]) * 0.1,
        mx.random.normal((e, d, i), key=k[2]) * 0.1,
    ]
    if not quantized:
        return Experts(*(Proj(w.astype(dtype)) for w in ws))
    projs = []
    for w in ws:
        wq, s, b = mx.quantize(w.astype(dtype), group_size, bits)
        projs.append(Proj(wq, s, b, group_size, bits))
    return Experts(*projs)


def make_case(n, seed=0, dtype=mx.float32, n_experts=E, k=K, d=D):
    """x [n, d], inds [n, k] int32 (distinct per token, EVERY in each row, NONE in none),
    weights [n, k] f32, shared [n, d]."""
    rng = np.random.default_rng(seed + n)
    inds = np.stack([rng.choice(np.arange(1, n_experts), k, replace=False) for _ in range(n)])
    for row in inds:
        if EVERY not in row:
            row[rng.integers(k)] = EVERY
    k1, k2, k3 = mx.random.split(mx.random.key(seed + 1000 + n), 3)
    x = mx.random.normal((n, d), key=k1).astype(dtype)
    weights = mx.random.uniform(shape=(n, k), key=k2) + 0.1
    shared = (mx.random.normal((n, d), key=k3) * 0.1).astype(dtype)
    return x, mx.array(inds.astype(np.int32)), weights, shared


def _np(a):
    return np.array(a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a)


def dispatch_stages(backend, x, inds, weights, ex: Experts, shared=None):
    """Runs the production kernel path (dispatch.run_kernels) on `backend` and returns
    every kernel's output as numpy."""
    if backend == "cpp":
        res = run_kernels("cpp", np.array(x), np.array(inds), np.array(weights), np_experts(ex),
                          None if shared is None else np.array(shared), stages=True)
    else:
        res = run_kernels(backend, x, inds, weights, ex, shared, stages=True)
    return {k_: (v if isinstance(v, np.ndarray) else _np(v)) for k_, v in res.items()}


def compare_dispatch(backend, n, ex: Experts | None = None, dtype=mx.float32, seed=0):
    """Max abs error of each stage of the kernel path against the reference (the integer
    stages: number of mismatching entries). The float stages get the reference fed with
    the kernel's own input of that stage, so errors do not compound."""
    ex = ex or make_experts(dtype=dtype)
    x, inds, w, shared = make_case(n, seed=seed, dtype=dtype)
    got = dispatch_stages(backend, x, inds, w, ex, shared)
    ref = {k_: _np(v) for k_, v in reference_stages(x, inds, w, ex, shared).items()}
    err = {k_: int((got[k_] != ref[k_]).sum()) for k_ in ("order", "pos", "slots")}
    # stage by stage: down and combine from the kernel's h / y
    idx = mx.array(np.array(inds).reshape(-1)[ref["order"]])
    h_in = mx.expand_dims(mx.array(got["h"]).astype(dtype), 1)
    y_ref = _np(ex.down(h_in, idx, sorted_indices=True)[:, 0])
    y_tok = got["y"][ref["pos"]].reshape(n, inds.shape[1], -1)
    out_ref = (y_tok * np.array(w)[..., None]).sum(1) + _np(shared)
    err["h"] = float(np.abs(got["h"] - ref["h"]).max())
    err["y"] = float(np.abs(got["y"] - y_ref).max())
    err["combine"] = float(np.abs(got["out"] - out_ref).max())
    err["out"] = float(np.abs(got["out"] - ref["out"]).max())
    return err


def compare_router(backend, n, n_experts=384, top_k=8, n_group=1, topk_group=1, seed=0,
                   rsf=2.827, norm=True):
    """(mismatching picks, max weight error) of the router kernel against the reference."""
    k1, k2 = mx.random.split(mx.random.key(seed), 2)
    logits = mx.random.normal((n, n_experts), key=k1) * 2
    bias = mx.random.normal((n_experts,), key=k2) * 0.1
    ri, rw = route_reference(logits, bias, top_k, n_group, topk_group, rsf, norm)
    if backend == "cpp":
        gi, gw = run_router("cpp", np.array(logits), np.array(bias), top_k, n_group, topk_group, rsf, norm)
    else:
        gi, gw = (np.array(a) for a in run_router(backend, logits, bias, top_k, n_group, topk_group, rsf, norm))
    ri, rw = np.array(ri), np.array(rw)
    oa, ob = np.argsort(gi, -1), np.argsort(ri, -1)
    gi, gw = np.take_along_axis(gi, oa, -1), np.take_along_axis(gw, oa, -1)
    ri, rw = np.take_along_axis(ri, ob, -1), np.take_along_axis(rw, ob, -1)
    return int((gi != ri).sum()), float(np.abs(gw - rw).max())


def random_packed(n_experts, out_dims, in_dims, group_size=64, bits=4, dtype=mx.bfloat16, seed=0) -> Proj:
    """Random affine-quantized experts in MLX's layout (uint32 codes with every bit random,
    scales and biases of a unit-variance output) without quantizing floats first: K2-sized
    layers in seconds. weight [E, out, in*bits/32], scales/biases [E, out, in/group_size]."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    shape = (n_experts, out_dims, in_dims * bits // 32)
    hi = mx.random.randint(0, 1 << 16, shape, key=k1).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, shape, key=k3).astype(mx.uint32)
    groups = (n_experts, out_dims, in_dims // group_size)
    scale = 2.0 / (np.sqrt(in_dims) * (2**bits - 1))
    scales = (mx.random.uniform(0.5, 1.5, groups, key=k2) * scale).astype(dtype)
    biases = (-scales.astype(mx.float32) * (2 ** (bits - 1))).astype(dtype)
    return Proj((hi << 16) | lo, scales, biases, group_size, bits)
