"""K2's mixture of experts: sigmoid router with noaux_tc selection, stacked SwiGLU experts
driven by `gather_mm` / `gather_qmm`, one always-on shared expert, and the dense MLP used by the
first `first_k_dense_replace` layers."""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from k2mlx.config import ModelArgs
from k2mlx.kernels.dispatch import LayerPlan, layer_experts, layer_route
from k2mlx.kernels.reference import gather_mm_any, route_compiled

# Sort tokens by expert when at least this many (token, expert) pairs are routed: gathers then
# walk each expert's weights once (prefill); for a few decode tokens sorting costs more.
SORT_THRESHOLD = 64


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


# noaux_tc routing (see route_reference), one fused graph per (shape, top_k, groups) like
# mlx-lm's router. logits [..., E] -> (expert indices [..., k], weights [..., k] float32)
route = route_compiled


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.routed_scaling_factor = args.routed_scaling_factor
        self.norm_topk_prob = args.norm_topk_prob
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))  # [E, hidden]
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))  # [E]
        self.plan = LayerPlan()  # replaced by MoE with the layer's shared plan

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        # Logits in the weight's dtype (float32 checkpoints: exactly the reference's float32
        # router); scores, selection and weights in float32. Up-casting a bf16 router weight
        # every step would cost K2 ~1 GB of extra memory traffic per token.
        logits = x.astype(self.weight.dtype) @ self.weight.T  # [..., E]
        # the router path (compiled MLX ops, or the fused kernel) was chosen at load
        return layer_route(
            self.plan, logits, self.e_score_correction_bias, self.top_k, self.n_group,
            self.topk_group, self.routed_scaling_factor, self.norm_topk_prob,
        )


class SwitchLinear(nn.Module):
    """Stacked per-expert linear: weight [E, out, in]; rows of x pick their expert."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return gather_mm_any(x, self.weight.swapaxes(-1, -2), indices, sorted_indices)  # w [E, in, out]

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", **_):
        E, out, inp = self.weight.shape
        q = QuantizedSwitchLinear(inp, out, E, group_size, bits, mode, weight=self.weight)
        return q


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with affine-quantized weights (uint32 weight, scales, biases)."""

    def __init__(self, input_dims, output_dims, num_experts, group_size=None, bits=None,
                 mode="affine", weight=None):
        super().__init__()
        from k2mlx.mlxlm_adapter import quant_defaults

        self.group_size, self.bits = quant_defaults(mode, group_size, bits)
        self.mode = mode
        if weight is None:
            # placeholders of the right shapes (replaced when the checkpoint loads)
            weight = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=mode)
        self.biases = biases[0] if biases else None
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """Routed experts: x [..., hidden], inds [..., k] -> per-expert outputs [..., k, hidden]."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        lead, k = indices.shape[:-1], indices.shape[-1]
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, hidden]
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= SORT_THRESHOLD
        idx, inv = indices, None
        if do_sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]  # [N*k, 1, hidden], grouped by expert
            idx = flat[order]
        g = self.gate_proj(x, idx, sorted_indices=do_sort)
        u = self.up_proj(x, idx, sorted_indices=do_sort)
        y = self.down_proj(nn.silu(g) * u, idx, sorted_indices=do_sort)  # [..., k, 1, hidden]
        if do_sort:
            y = y[inv].reshape(*lead, k, 1, y.shape[-1])
        return y.squeeze(-2)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = MoEGate(args)
        # how the router and routed experts run: the default (switch, compiled router) until
        # k2mlx.kernels.policy.configure sets it at load; one object shared with the gate
        self.plan = self.gate.plan
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)  # [..., k], [..., k]
        shared = self.shared_experts(x) if "shared_experts" in self else None
        # sum_j weights_j * switch_mlp(x, inds)_j (+ shared) on the path planned at load
        return layer_experts(self.plan, x, inds, weights, self.switch_mlp, shared)  # [..., hidden]
