"""MLX-quantized checkpoints and the quantization rules shared by load, convert and plan.

An MLX checkpoint stores a quantized module `X` as `X.weight` (uint32 words), `X.scales` and
`X.biases`, and config.json carries
  "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                   "model.layers.3.self_attn.q_b_proj": {"group_size": 64, "bits": 8},
                   "model.embed_tokens": false, ...}
(per-module entries override the default; `false` keeps a module float). mlx-lm writes and
reads the same form, so checkpoints move between the two.
"""
from __future__ import annotations

import re

from k2mlx.errors import ConfigError

# module classes a user can give their own bits on convert (`--expert-bits 4 --attention-bits 8`)
CLASSES = ("experts", "shared", "attention", "dense", "embed", "head")


def module_class(path: str) -> str:
    """Which user-facing class a module path belongs to (see CLASSES; 'other' otherwise)."""
    if ".switch_mlp." in path or ".experts." in path:
        return "experts"
    if ".shared_experts." in path:
        return "shared"
    if ".self_attn." in path:
        return "attention"
    if path.startswith("model.embed_tokens"):
        return "embed"
    if path.startswith("lm_head"):
        return "head"
    if re.search(r"\.mlp\.(gate|up|down)_proj$", path):
        return "dense"
    return "other"


def get_quantization(config: dict) -> dict | None:
    """The MLX `quantization` dict of a config (mlx-lm also mirrors it as quantization_config)."""
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "bits" in qc and "group_size" in qc:
            q = qc
    if q is None:
        return None
    for key in ("bits", "group_size"):
        if key not in q:
            raise ConfigError(f"quantization is missing '{key}'", key=f"quantization.{key}")
    if not 2 <= int(q["bits"]) <= 8:
        raise ConfigError(f"quantization bits must be 2..8, got {q['bits']}", key="quantization.bits")
    return q


def text_quantization(quantization: dict | None) -> dict | None:
    """A `quantization` whose per-module keys use the text model's own paths: K2.5-family
    checkpoints (model_type kimi_k25) key them under `language_model.`; entries of the dropped
    vision tower go."""
    if not quantization:
        return quantization
    out = {}
    for k, v in quantization.items():
        if k.startswith("language_model."):
            out.setdefault(k[len("language_model."):], v)
        elif not k.startswith(("vision_tower.", "vision_model.", "mm_projector.", "multi_modal_projector.")):
            out[k] = v
    return out


def module_params(quantization: dict | None, path: str):
    """Quantization of one module: {'bits', 'group_size', 'mode'} or None to keep it float."""
    if not quantization:
        return None
    default = {k: quantization[k] for k in ("bits", "group_size") if k in quantization}
    default["mode"] = quantization.get("mode", "affine")
    if path in quantization:
        own = quantization[path]
        if own is False:
            return None
        if isinstance(own, dict):
            return {**default, **own}
    return default

def rule_quantization(bits: int, group_size: int, class_bits: dict | None = None,
                      mode: str = "affine", paths: dict | None = None) -> dict:
    """A rule: default bits, bits per class (0 or 16 = keep float) and optional per-path
    entries as in an MLX `quantization` ({path: {"bits", "group_size"} | False}); used by
    convert and plan on a float model, and by load to quantize on load."""
    for c in (class_bits or {}):
        if c not in CLASSES:
            raise ConfigError(f"unknown module class {c!r}; use one of {', '.join(CLASSES)}")
    return {"bits": bits, "group_size": group_size, "mode": mode, "classes": dict(class_bits or {}),
            "paths": dict(paths or {})}


def rule_params(rule: dict, path: str, in_dim: int | None = None):
    """Params a rule gives one module, or None (float): classes may override bits; a module
    whose input size is not a multiple of the group size stays float."""
    own = rule.get("paths", {}).get(path)
    if own is False:
        return None
    if isinstance(own, dict):
        group = int(own.get("group_size", rule["group_size"]))
        if in_dim is not None and in_dim % group:
            return None
        return {"bits": int(own.get("bits", rule["bits"])), "group_size": group, "mode": rule["mode"]}
    bits = rule["classes"].get(module_class(path), rule["bits"])
    if not bits or bits >= 16:
        return None
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits must be 2..8 (or 16 for float), got {bits} for {path}")
    if in_dim is not None and in_dim % rule["group_size"]:
        return None
    return {"bits": int(bits), "group_size": int(rule["group_size"]), "mode": rule["mode"]}


def rule_predicate(rule: dict):
    """nn.quantize class_predicate that applies a rule to a float model (plan, convert)."""

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            return False
        return rule_params(rule, path, module.weight.shape[-1]) or False

    return predicate


def config_quantization(rule: dict, paths: dict) -> dict:
    """config.json `quantization` for a converted model: default bits/group, plus an entry for
    every module (`paths`: path -> params or None) that differs from the default."""
    q = {"group_size": rule["group_size"], "bits": rule["bits"], "mode": rule["mode"]}
    used = [(p["bits"], p["group_size"]) for p in paths.values() if p]
    if not rule["bits"] or rule["bits"] >= 16:  # float by default: the most common setting heads it
        if not used:
            return None
        q["bits"], q["group_size"] = max(set(used), key=used.count)
    for path, p in sorted(paths.items()):
        if p is None:
            q[path] = False
        elif p["bits"] != q["bits"] or p["group_size"] != q["group_size"]:
            q[path] = {"group_size": p["group_size"], "bits": p["bits"]}
    return q


def quantize_weights(weights: dict, model, rule: dict, quantization: dict | None = None) -> tuple[dict, dict]:
    """Quantize, on load, every float `X.weight` whose module X can be quantized under `rule`
    (modules the checkpoint already holds quantized keep their own codes and settings).

    Returns (weights, quantization) where quantization is the checkpoint's own (if any) plus a
    per-module entry for each module quantized here, ready for the loader's predicate."""
    import mlx.core as mx

    out = dict(weights)
    q = dict(quantization) if quantization else {"group_size": rule["group_size"], "bits": rule["bits"],
                                                 "mode": rule["mode"]}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or f"{path}.weight" not in out or f"{path}.scales" in out:
            continue
        w = out[f"{path}.weight"]
        params = rule_params(rule, path, w.shape[-1])
        if params is None:
            continue
        out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = mx.quantize(
            w, params["group_size"], params["bits"], mode=params["mode"])
        q[path] = {"group_size": params["group_size"], "bits": params["bits"]}
    return out, q
