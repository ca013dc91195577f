"""The timed first-load probe: on this machine, with one layer's own weights (so its dtype,
bits, group size and expert shapes), do the kernels (a) agree with the reference and (b) run
faster than the default path at 1 token and at small batches?

Agreement: each path's output against a float32 reference (the same quantized weights of the
experts in use, scales and activations in float32, sorted gather_qmm). The kernels agree when
their error is no larger than max(2 x the default path's own error, a floor for the dtype).
Speed: median of interleaved timed calls, within a wall-clock budget of a few seconds.
`decide` turns a measurement into the choice; policy caches it.
"""
from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np

from k2mlx.kernels.dispatch import kernel_forward, moe_forward, router_kernel
from k2mlx.kernels.launch import dims
from k2mlx.kernels.reference import Experts, Proj, dispatch_reference, route_compiled, route_reference

TIMED_TOKENS = (1, 4, 16)  # decode, and small batches
AGREE_TOKENS = (1, 4)  # the float32 reference copies the experts in use: keep it small
FASTER = 0.97  # "faster" = median at most 97% of the default's: not a coin flip in the noise
# error relative to max |reference| that any path may have in this activation dtype
ERROR_FLOOR = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}


def _dtype_name(d) -> str:
    return str(d).rsplit(".", 1)[-1]


def case(n, n_experts, k, D, dtype, seed=0):
    """Random activations [n, D] (unit scale, as after RMSNorm), k distinct experts per
    token, combine weights [n, k] float32."""
    rng = np.random.default_rng(seed + n)
    inds = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n)]).astype(np.int32)
    x = mx.random.normal((n, D), key=mx.random.key(seed + n)).astype(dtype)
    w = mx.random.uniform(shape=(n, k), key=mx.random.key(seed + 100 + n)) + 0.1
    return x, mx.array(inds), w


def reference_f32(ex: Experts, x, inds, w):
    """The routed experts in float32 on the quantized weights of the experts in use only."""
    used = np.unique(np.array(inds))
    remap = np.zeros(ex.num_experts, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    sel = mx.array(used.astype(np.int32))

    def sub(p: Proj) -> Proj:
        if not p.quantized:
            return Proj(p.weight[sel].astype(mx.float32))
        return Proj(p.weight[sel], p.scales[sel].astype(mx.float32),
                    None if p.biases is None else p.biases[sel].astype(mx.float32),
                    p.group_size, p.bits, p.mode)

    sub_ex = Experts(sub(ex.gate), sub(ex.up), sub(ex.down))
    return dispatch_reference(x.astype(mx.float32), mx.array(remap[np.array(inds)]), w, sub_ex)


def _rel(a, ref) -> float:
    ref = np.array(ref.astype(mx.float32))
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(np.array(a.astype(mx.float32)) - ref).max()) / scale


def _time(fns: dict, budget_s: float, min_iters=3, max_iters=30, warmup=2) -> dict:
    """Median seconds per call of each fn, calls interleaved so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            mx.eval(fn())
    ts = {name: [] for name in fns}
    t_end = time.perf_counter() + budget_s
    for i in range(max_iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            mx.eval(fn())
            ts[name].append(time.perf_counter() - t)
        if i + 1 >= min_iters and time.perf_counter() > t_end:
            break
    return {name: statistics.median(v) for name, v in ts.items()}


def measure_experts(switch_mlp, top_k: int, backend: str, budget_s: float = 2.0,
                    timed=TIMED_TOKENS) -> dict:
    """{"error": str} when the kernels raise, else {"agree": {n: {"kernel": e, "switch": e}},
    "ms": {n: {"kernel": t, "switch": t}}, "dtype": name}."""
    ex = Experts.of(switch_mlp)
    E, D, _, _, _ = dims(ex)
    dtype = ex.gate.scales.dtype
    out = {"dtype": _dtype_name(dtype), "agree": {}, "ms": {}}
    try:
        for n in AGREE_TOKENS:
            x, inds, w = case(n, E, top_k, D, dtype)
            ref = reference_f32(ex, x, inds, w)
            got_k = kernel_forward(backend, x, inds, w, switch_mlp)
            got_s = moe_forward(x, inds, w, switch_mlp, path="switch")
            out["agree"][n] = {"kernel": _rel(got_k, ref), "switch": _rel(got_s, ref)}
        per_n = budget_s / len(timed)
        for n in timed:
            x, inds, w = case(n, E, top_k, D, dtype, seed=1)
            t = _time({"switch": lambda: moe_forward(x, inds, w, switch_mlp, path="switch"),
                       "kernel": lambda: kernel_forward(backend, x, inds, w, switch_mlp)}, per_n)
            out["ms"][n] = {k: v * 1e3 for k, v in t.items()}
    except Exception as e:  # noqa: BLE001 - a kernel that fails here is simply not used
        return {"error": f"{type(e).__name__}: {e}"[:500], "dtype": out["dtype"]}
    return out


def measure_router(n_experts, top_k, n_group, topk_group, scaling, norm, logits_dtype, backend,
                   budget_s: float = 0.5, timed=TIMED_TOKENS) -> dict:
    """Same shape of result for the router kernel against the compiled MLX-ops router:
    "agree" holds wrong picks and max weight error at 1 and 4 tokens."""
    bias = mx.random.normal((n_experts,), key=mx.random.key(7)) * 0.1
    args = (top_k, n_group, topk_group, scaling, norm)

    def kernel(lg):
        return router_kernel(backend, lg, bias, *args)

    out = {"agree": {}, "ms": {}}
    try:
        for n in AGREE_TOKENS:
            lg = (mx.random.normal((n, n_experts), key=mx.random.key(n)) * 2).astype(logits_dtype)
            ri, rw = (np.array(a) for a in route_reference(lg, bias, *args))
            gi, gw = (np.array(a) for a in kernel(lg))
            oa, ob = np.argsort(gi, -1), np.argsort(ri, -1)
            bad = int((np.take_along_axis(gi, oa, -1) != np.take_along_axis(ri, ob, -1)).sum())
            werr = float(np.abs(np.take_along_axis(gw, oa, -1) - np.take_along_axis(rw, ob, -1)).max())
            out["agree"][n] = {"wrong_picks": bad, "weight_error": werr}
        for n in timed:
            lg = (mx.random.normal((n, n_experts), key=mx.random.key(50 + n)) * 2).astype(logits_dtype)
            t = _time({"switch": lambda: route_compiled(lg, bias, *args), "kernel": lambda: kernel(lg)},
                      budget_s / len(timed))
            out["ms"][n] = {k: v * 1e3 for k, v in t.items()}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def _faster(m: dict) -> tuple[bool, str]:
    slow = [n for n, t in m["ms"].items() if not t["kernel"] <= FASTER * t["switch"]]
    times = ", ".join(f"{n} tok {t['kernel']:.3g} vs {t['switch']:.3g} ms" for n, t in m["ms"].items())
    return not slow, times


def decide_experts(m: dict) -> tuple[bool, str]:
    """(use the kernels, why) from measure_experts' result."""
    if "error" in m:
        return False, f"the kernels failed: {m['error']}"
    floor = ERROR_FLOOR.get(m["dtype"], 2e-2)
    for n, e in m["agree"].items():
        if not e["kernel"] <= max(2 * e["switch"], floor):
            return False, (f"the kernels disagree at {n} tokens (error {e['kernel']:.2e} vs "
                           f"switch {e['switch']:.2e} against float32)")
    fast, times = _faster(m)
    return fast, ("kernels faster" if fast else "kernels not faster") + f" ({times})"


def decide_router(m: dict) -> tuple[bool, str]:
    if "error" in m:
        return False, f"the router kernel failed: {m['error']}"
    for n, e in m["agree"].items():
        if e["wrong_picks"] or not e["weight_error"] < 1e-5:
            return False, f"the router kernel disagrees at {n} tokens ({e})"
    fast, times = _faster(m)
    return fast, ("router kernel faster" if fast else "router kernel not faster") + f" ({times})"
