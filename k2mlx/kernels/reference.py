"""Reference paths built from MLX ops: the router, and grouped expert dispatch that sorts the
(token, expert) pairs by expert and feeds `gather_qmm(..., sorted_indices=True)`, the same
grouping the kernels use. They run everywhere and are what the kernels are checked against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


def route_reference(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob):
    """noaux_tc routing. logits [..., E] -> (expert indices [..., k] int32, weights [..., k] float32);
    indices in no particular order. The model's router is this function compiled
    (route_compiled); the router kernel is checked against it.

    Selection uses sigmoid(logits) + bias (restricted to the best `topk_group` groups, a
    group scoring the sum of its two best experts); the weights are the plain sigmoid of
    the selected experts, renormalized when `norm_topk_prob`, times the scaling factor."""
    scores = mx.sigmoid(logits.astype(mx.float32))  # [..., E]
    choice = scores + bias.astype(mx.float32)
    if n_group > 1 and topk_group < n_group:
        E = choice.shape[-1]
        grouped = choice.reshape(*choice.shape[:-1], n_group, E // n_group)  # [..., G, E/G]
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)  # [..., G]
        kth_best = mx.topk(group_scores, topk_group, axis=-1).min(axis=-1, keepdims=True)
        keep = mx.expand_dims(group_scores >= kth_best, -1)  # [..., G, 1]
        # -inf, not 0: with a negative correction bias a zeroed expert could still win
        grouped = mx.where(keep, grouped, mx.array(-math.inf, mx.float32))
        choice = grouped.reshape(choice.shape)
    inds = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]  # [..., k]
    inds = mx.stop_gradient(inds)
    weights = mx.take_along_axis(scores, inds, axis=-1)  # [..., k]
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds.astype(mx.int32), weights * routed_scaling_factor


# the model's router: one fused graph per (shape, top_k, groups), like mlx-lm's
route_compiled = mx.compile(route_reference)


def gather_mm_any(x: mx.array, w: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
    """`mx.gather_mm(x, w[E, in, out], rhs_indices=idx)` for float weights of any dtype.

    MLX's CPU gather_mm is float32-only: a bf16 checkpoint (or a converted one whose small
    down_proj stayed float) would fail there, so it computes in float32 and keeps x's dtype."""
    if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
        y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=idx,
                         sorted_indices=sorted_indices)
        return y.astype(x.dtype)
    return mx.gather_mm(x, w, rhs_indices=idx, sorted_indices=sorted_indices)


@dataclass
class Proj:
    """One stacked projection of the routed experts: weight [E, out, in] (float) or the
    affine-quantized triple (weight uint32 [E, out, in*bits/32], scales, biases [E, out, in/gs])."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    group_size: int = 64
    bits: int = 4
    mode: str = "affine"

    @classmethod
    def of(cls, module) -> "Proj":
        if "scales" in module:
            return cls(module["weight"], module["scales"], module.get("biases"),
                       module.group_size, module.bits, getattr(module, "mode", "affine"))
        return cls(module["weight"])

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def __call__(self, x, idx, sorted_indices=False):
        if self.quantized:
            return mx.gather_qmm(
                x, self.weight, self.scales, self.biases, rhs_indices=idx, transpose=True,
                group_size=self.group_size, bits=self.bits, mode=self.mode,
                sorted_indices=sorted_indices,
            )
        return gather_mm_any(x, self.weight.swapaxes(-1, -2), idx, sorted_indices)

    def dense(self) -> mx.array:
        """[E, out, in] float weights (dequantized when quantized)."""
        if not self.quantized:
            return self.weight
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits,
                             mode=self.mode)


@dataclass
class Experts:
    gate: Proj
    up: Proj
    down: Proj

    @classmethod
    def of(cls, switch_mlp) -> "Experts":
        if isinstance(switch_mlp, Experts):
            return switch_mlp
        return cls(Proj.of(switch_mlp.gate_proj), Proj.of(switch_mlp.up_proj),
                   Proj.of(switch_mlp.down_proj))

    @property
    def num_experts(self) -> int:
        return self.gate.weight.shape[0]

    @property
    def quantized(self) -> bool:
        return self.gate.quantized and self.up.quantized and self.down.quantized


def group_pairs(inds: mx.array, num_experts: int):
    """inds [N, k] -> (order [P]: sorted position -> pair, idx [P]: expert of each sorted
    pair, inv [P]: pair -> sorted position). Pairs of one expert keep token order."""
    flat = inds.reshape(-1).astype(mx.int32)  # [P]
    P = flat.size
    # a unique key per pair makes the order the stable one whatever argsort does with ties
    if num_experts * P < 2**31:
        order = mx.argsort(flat * P + mx.arange(P, dtype=mx.int32))
    else:
        order = mx.argsort(flat)
    inv = mx.argsort(order)
    return order, flat[order], inv


def dispatch_reference(x, inds, weights, experts, shared=None):
    """Grouped routed-expert forward + combine. x [..., D], inds/weights [..., k],
    shared [..., D] or None -> [..., D]. Sorted pairs go through `gather_qmm` with
    sorted_indices=True, so each expert's weights are walked once for all its tokens."""
    ex = Experts.of(experts)
    lead, D, k = x.shape[:-1], x.shape[-1], inds.shape[-1]
    x2 = x.reshape(-1, D)  # [N, D]
    order, idx, inv = group_pairs(inds.reshape(-1, k), ex.num_experts)
    xs = mx.expand_dims(x2[order // k], 1)  # [P, 1, D], expert-grouped
    g = ex.gate(xs, idx, sorted_indices=True)  # [P, 1, I]
    u = ex.up(xs, idx, sorted_indices=True)
    y = ex.down(nn.silu(g) * u, idx, sorted_indices=True)  # [P, 1, D]
    y = y[inv].reshape(*lead, k, D)  # back to token order
    out = (y * weights[..., None]).sum(axis=-2).astype(y.dtype)  # [..., D]
    if shared is not None:
        out = out + shared
    return out


def dispatch_naive(x, inds, weights, experts, shared=None):
    """The plainest statement of the math, one token and one expert at a time, float32 on
    dequantized weights. Only for tests."""
    import numpy as np

    ex = Experts.of(experts)
    wg, wu, wd = (np.array(p.dense().astype(mx.float32)) for p in (ex.gate, ex.up, ex.down))
    xn = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
    ind = np.array(inds).reshape(xn.shape[0], -1)
    wts = np.array(weights.astype(mx.float32)).reshape(ind.shape)
    out = np.zeros_like(xn)
    for n in range(xn.shape[0]):
        for j in range(ind.shape[1]):
            e = int(ind[n, j])
            g = wg[e] @ xn[n]
            h = g / (1.0 + np.exp(-g)) * (wu[e] @ xn[n])
            out[n] += wts[n, j] * (wd[e] @ h)
    if shared is not None:
        out += np.array(shared.astype(mx.float32)).reshape(out.shape)
    return out.reshape(x.shape)


def reference_stages(x2, inds, weights, experts, shared=None):
    """The kernel path's intermediates computed with MLX ops, for checking each kernel:
    order [P], pos [P], slots [P, 3] (expert, start, count; (-1, 0, 0) when unused),
    h [P, I] and y [P, D] in expert-grouped order, out [N, D]. x2 [N, D], inds [N, k]."""
    import numpy as np

    ex = Experts.of(experts)
    N, k = inds.shape
    order, idx, inv = group_pairs(inds, ex.num_experts)
    xs = mx.expand_dims(x2[order // k], 1)  # [P, 1, D]
    g = ex.gate(xs, idx, sorted_indices=True)
    u = ex.up(xs, idx, sorted_indices=True)
    h = nn.silu(g) * u  # [P, 1, I]
    y = ex.down(h, idx, sorted_indices=True)  # [P, 1, D]
    counts = np.bincount(np.array(inds).reshape(-1), minlength=ex.num_experts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    used = np.nonzero(counts)[0]
    slots = np.full((N * k, 3), [-1, 0, 0], np.int32)
    slots[: len(used)] = np.stack([used, starts[used], counts[used]], 1)
    out = dispatch_reference(x2, inds, weights, ex, shared)
    return {
        "order": order, "pos": inv, "slots": mx.array(slots), "h": h[:, 0], "y": y[:, 0], "out": out,
    }
