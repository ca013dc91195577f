"""Fused noaux_tc router: sigmoid, correction bias, group-limited top-k, renormalization and
scaling in one kernel (one threadgroup per token). Whether a model uses it is decided at load
(k2mlx.kernels.policy); this module only runs it."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from k2mlx.kernels.launch import launch, round32


def router_unsupported(n_experts: int, top_k: int, n_group: int, topk_group: int) -> str | None:
    if n_group < 1 or n_experts % n_group:
        return f"n_group {n_group} must divide n_routed_experts {n_experts}"
    if not 1 <= top_k <= n_experts:
        return f"top_k {top_k} out of range"
    if n_experts > 32 * 1024:
        return "too many experts for one threadgroup"
    return None


def run_router(backend, logits2, bias, top_k, n_group, topk_group, routed_scaling_factor,
               norm_topk_prob):
    """logits2 [N, E] -> (inds [N, k] int32 best first, weights [N, k] float32).
    backend "metal"/"cuda" (mx arrays) or "cpp" (numpy)."""
    N, E = logits2.shape
    c = {"E": E, "TOPK": top_k, "NG": n_group, "TKG": topk_group, "NORM": int(bool(norm_topk_prob))}
    if backend == "cpp":
        ins = [logits2.astype(np.float32), np.asarray(bias, np.float32),
               np.array([routed_scaling_factor], np.float32)]
        i32, f32 = np.int32, np.float32
    else:
        ins = [logits2, bias.astype(mx.float32), mx.array([routed_scaling_factor], mx.float32)]
        i32, f32 = mx.int32, mx.float32
    return launch(backend, "router", c, ins, [(N, top_k), (N, top_k)], [i32, f32],
                  n_tg=N, tg=round32(E, 256))


def fused_route(backend, logits, bias, top_k, n_group, topk_group, routed_scaling_factor,
                norm_topk_prob):
    """logits [..., E] -> (inds [..., k], weights [..., k] float32) by the router kernel."""
    E = logits.shape[-1]
    lead = logits.shape[:-1]
    inds, w = run_router(backend, logits.reshape(-1, E), bias, top_k, n_group, topk_group,
                         routed_scaling_factor, norm_topk_prob)
    return inds.reshape(*lead, top_k), w.reshape(*lead, top_k)
