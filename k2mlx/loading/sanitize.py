"""`sanitize(weights, args)`: checkpoint tensor names and layouts -> `Model` parameters.

Pure: returns a new dict and never mutates its input. Steps, in order:
1. `canonical_name`: strip K2.5's `language_model.` prefix, drop its vision tower, the MTP
   layers (`model.layers.{>= num_hidden_layers}`) and precomputed rotary buffers;
2. format hooks (`from_compressed_tensors`, `from_fp8`): turn packed INT4 / FP8 tensors into
   MLX-native ones. They are filled in by `k2mlx.loading.formats`; without it a checkpoint that
   needs them fails with a CheckpointError naming the tensor;
3. `stack_experts`: per-expert `mlp.experts.{e}.{gate,up,down}_proj.{weight,scales,biases}`
   (real K2 layout) -> `mlp.switch_mlp.{gate,up,down}_proj.*` of shape [E, ...];
4. `split_fused_experts`: transformers-5 `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows
   first) and `mlp.experts.down_proj` [E, H, I] -> the same stacked names.
kv_b_proj stays as it is (the absorbed attention reads its per-head halves), and so do
mlx-lm's already split `self_attn.embed_q` / `unembed_out` (see model/mla.py).
"""
from __future__ import annotations

import re
from collections import defaultdict

import mlx.core as mx

from k2mlx.errors import CheckpointError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)(\.weight)?$")
_DROPPED_PREFIXES = ("vision_tower.", "mm_projector.", "multi_modal_projector.", "vision_model.")


def canonical_name(name: str, num_hidden_layers: int) -> str | None:
    """The parameter name a checkpoint tensor maps to, or None when the model never uses it."""
    if name.startswith("language_model."):  # kimi_k25 nests the text model
        name = name[len("language_model."):]
    if name.startswith(_DROPPED_PREFIXES) or "rotary_emb.inv_freq" in name:
        return None
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= num_hidden_layers:  # MTP / next-token-prediction layers
        return None
    return name


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


# ---- format hooks (k2mlx.loading.formats fills these in) ----

def _needs(weights: dict, suffixes: tuple[str, ...]) -> list[str]:
    return [k for k in weights if k.endswith(suffixes)]


def from_compressed_tensors(weights: dict, args) -> dict:
    """compressed-tensors pack-quantized INT4 (`weight_packed`, `weight_scale`, `weight_shape`)
    -> MLX affine 4-bit (`weight`, `scales`, `biases`). Hook for k2mlx.loading.formats."""
    keys = _needs(weights, (".weight_packed",))
    if not keys:
        return weights
    try:
        from k2mlx.loading.formats.compressed_tensors import convert_weights
    except ImportError as e:
        raise CheckpointError(
            "compressed-tensors INT4 weights are not supported by this build", tensor=keys[0]
        ) from e
    return convert_weights(weights, args)


def from_fp8(weights: dict, args) -> dict:
    """Block-scaled FP8 (`weight` e4m3 + `weight_scale_inv`) -> dequantized weights.
    Hook for k2mlx.loading.formats."""
    keys = _needs(weights, (".weight_scale_inv",))
    if not keys:
        return weights
    try:
        from k2mlx.loading.formats.fp8 import convert_weights
    except ImportError as e:
        raise CheckpointError("FP8 weights are not supported by this build", tensor=keys[0]) from e
    return convert_weights(weights, args)


# ---- expert layouts ----

def stack_experts(weights: dict, args) -> dict:
    """Per-expert tensors -> stacked switch_mlp tensors [E, ...]."""
    groups: dict[tuple[str, str, str], dict[int, str]] = defaultdict(dict)
    for k in weights:
        m = _EXPERT.match(k)
        if m:
            prefix, e, proj, kind = m.groups()
            groups[(prefix, proj, kind)][int(e)] = k
    if not groups:
        return weights
    out = dict(weights)
    E = args.n_routed_experts
    for (prefix, proj, kind), by_expert in groups.items():
        for e in range(E):
            if e not in by_expert:
                raise CheckpointError(
                    f"expert {e} of {E} is missing", tensor=f"{prefix}.experts.{e}.{proj}.{kind}"
                )
        extra = sorted(set(by_expert) - set(range(E)))
        if extra:
            raise CheckpointError(
                f"expert index {extra[0]} >= n_routed_experts {E}",
                tensor=by_expert[extra[0]],
            )
        parts = [out.pop(by_expert[e]) for e in range(E)]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise CheckpointError(f"experts have different shapes {sorted(shapes)}",
                                  tensor=by_expert[0])
        out[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack(parts)
    return out


def split_fused_experts(weights: dict, args) -> dict:
    """transformers-5 fused experts -> stacked switch_mlp weights."""
    fused = {k: _FUSED.match(k) for k in weights}
    fused = {k: m for k, m in fused.items() if m}
    if not fused:
        return weights
    out = dict(weights)
    inter = args.moe_intermediate_size
    for k, m in fused.items():
        prefix, which = m.group(1), m.group(2)
        w = out.pop(k)
        if which == "gate_up_proj":
            if w.ndim != 3 or w.shape[1] != 2 * inter:
                raise CheckpointError(
                    f"expected shape [E, {2 * inter}, hidden], got {list(w.shape)}", tensor=k
                )
            out[f"{prefix}.switch_mlp.gate_proj.weight"] = w[:, :inter, :]
            out[f"{prefix}.switch_mlp.up_proj.weight"] = w[:, inter:, :]
        else:
            out[f"{prefix}.switch_mlp.down_proj.weight"] = w
    return out


def sanitize(weights: dict, args) -> dict:
    """Checkpoint tensors (any supported layout) -> `Model` parameter names and shapes."""
    out = {}
    for k, v in weights.items():
        name = canonical_name(k, args.num_hidden_layers)
        if name is not None:
            out[name] = v
    out = from_compressed_tensors(out, args)
    out = from_fp8(out, args)
    out = stack_experts(out, args)
    out = split_fused_experts(out, args)
    return out
