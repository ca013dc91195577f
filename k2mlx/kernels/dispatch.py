"""Running one MoE layer on the path chosen for it at load.

`LayerPlan` is set once at load by k2mlx.kernels.policy.configure (measured, cached,
overridable); nothing here reads the environment. Paths for the routed experts:
  switch     the model's own switch_mlp call (MLX's gather_qmm, what mlx-lm runs): the default
  reference  k2mlx's grouped MLX-ops dispatch (pairs sorted by expert, sorted gather_qmm)
  kernel     k2mlx's expert kernels (k2mlx.kernels.launch) for up to MAX_KERNEL_TOKENS tokens,
             switch above that
and for the router: "compiled" (route_reference under mx.compile) or "kernel" (fused router).
A kernel that raises at its first call in a layer is replaced there by switch / compiled,
with one logging warning per kind of failure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from k2mlx.kernels.launch import MAX_KERNEL_TOKENS, run_kernels
from k2mlx.kernels.reference import Experts, Proj, dispatch_reference, route_compiled
from k2mlx.kernels.router import fused_route

log = logging.getLogger(__name__)

EXPERT_PATHS = ("switch", "reference", "kernel")
ROUTER_PATHS = ("compiled", "kernel")


@dataclass
class LayerPlan:
    """How one MoE layer runs. `backend`: the kernels' backend ("metal", "cuda"; "cpp", the
    C++ twin, only in tests) when experts or router is "kernel"."""

    experts: str = "switch"
    router: str = "compiled"
    backend: str | None = None
    name: str = "moe"
    experts_ran: bool = False  # the kernel has completed one call in this layer
    router_ran: bool = False


_warned: set[tuple] = set()
_DEFAULT = {"experts": "switch", "router": "compiled"}


def _first_calls_guarded(plan: LayerPlan, what: str, fn):
    """fn() for the layer's `what` ("experts" or "router") kernel. Its first call in a layer is
    evaluated at once, so a compile or launch failure surfaces here, not later in some unrelated
    mx.eval. On failure: one warning per kind of failure, the layer keeps to the default path
    from then on, and None is returned."""
    if getattr(plan, f"{what}_ran"):
        return fn()
    try:
        out = fn()
        mx.eval(out)
        setattr(plan, f"{what}_ran", True)
        return out
    except Exception as e:  # noqa: BLE001 - any kernel failure: warn once, use the default
        kind = (what, plan.backend, type(e).__name__, str(e)[:200])
        msg = (f"k2mlx: the {plan.backend} {what} kernel failed at its first call in {plan.name} "
               f"({type(e).__name__}: {e}); that layer (and any other that fails the same way) "
               f"uses the {_DEFAULT[what]} path from now on")
        if kind in _warned:
            log.debug(msg, exc_info=True)
        else:
            _warned.add(kind)
            log.warning(msg, exc_info=True)
        setattr(plan, what, _DEFAULT[what])
        return None


def np_experts(ex: Experts) -> Experts:
    """The same experts as numpy arrays, for the C++ twin."""
    return Experts(*(Proj(np.array(p.weight), np.array(p.scales), np.array(p.biases), p.group_size,
                          p.bits, p.mode) for p in (ex.gate, ex.up, ex.down)))


def kernel_forward(backend, x, inds, weights, switch_mlp, shared=None):
    """The expert kernels on x [..., D], inds/weights [..., k] -> [..., D]."""
    ex = Experts.of(switch_mlp)
    D, k = x.shape[-1], inds.shape[-1]
    args = (x.reshape(-1, D), inds.reshape(-1, k), weights.reshape(-1, k),
            None if shared is None else shared.reshape(-1, D))
    if backend == "cpp":  # the C++ twin works on float32 numpy arrays
        args = tuple(None if a is None else np.array(a.astype(mx.float32)) for a in args)
        out = mx.array(run_kernels("cpp", *args[:3], np_experts(ex), args[3])).astype(x.dtype)
    else:
        out = run_kernels(backend, *args[:3], ex, args[3])
    return out.reshape(x.shape)


def moe_forward(x, inds, weights, switch_mlp, shared=None, path: str = "switch", backend=None):
    """Routed experts + combine (+ shared expert output): x [..., D], inds/weights [..., k]
    -> [..., D], equal to sum_j weights_j * switch_mlp(x, inds)_j (+ shared). `path`: one
    of EXPERT_PATHS; "kernel" needs `backend`."""
    if path == "kernel":
        return kernel_forward(backend, x, inds, weights, switch_mlp, shared)
    if path == "switch":
        y = switch_mlp(x, inds)  # [..., k, D]
        y = (y * weights[..., None]).sum(axis=-2).astype(y.dtype)
        return y if shared is None else y + shared
    if path == "reference":
        return dispatch_reference(x, inds, weights, Experts.of(switch_mlp), shared)
    raise ValueError(f"unknown MoE path {path!r} (one of {', '.join(EXPERT_PATHS)})")


def layer_experts(plan: LayerPlan, x, inds, weights, switch_mlp, shared=None):
    """moe_forward on the layer's planned path (kernel: up to MAX_KERNEL_TOKENS tokens)."""
    if plan.experts == "kernel" and x.size // x.shape[-1] <= MAX_KERNEL_TOKENS:
        out = _first_calls_guarded(
            plan, "experts", lambda: kernel_forward(plan.backend, x, inds, weights, switch_mlp, shared))
        if out is not None:
            return out
    path = "switch" if plan.experts == "kernel" else plan.experts
    return moe_forward(x, inds, weights, switch_mlp, shared, path)


def router_kernel(backend, logits, *args):
    """fused_route on mx arrays for any backend ("cpp": through numpy)."""
    if backend == "cpp":
        inds, w = fused_route("cpp", np.array(logits.astype(mx.float32)), np.array(args[0]), *args[1:])
        return mx.array(inds), mx.array(w)
    return fused_route(backend, logits, *args)


def layer_route(plan: LayerPlan, logits, bias, top_k, n_group, topk_group, scaling, norm):
    """noaux_tc routing on the layer's planned router path: logits [..., E] -> (inds, weights)."""
    args = (bias, top_k, n_group, topk_group, scaling, norm)
    if plan.router == "kernel":
        out = _first_calls_guarded(plan, "router", lambda: router_kernel(plan.backend, logits, *args))
        if out is not None:
            return out
    return route_compiled(logits, *args)
