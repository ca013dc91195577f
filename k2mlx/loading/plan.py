"""Size a model and split its layers across hosts of different memory.

Sizes are exact: the model is built lazily (MLX arrays cost no memory until evaluated), cast
to bf16 and quantized with the requested rule, and the bytes of every parameter are summed
per component. Nothing is ever evaluated, so planning the full 1T-parameter K2 takes seconds
and a few MB.

Public API used by `k2mlx.distributed`:

    split_layers(args, memories_gb, bits=4, group_size=64, context=0) -> list[range]

returns one contiguous range of absolute layer indices per host, in host order (host 0 also
holds the embedding, the last host the final norm and lm_head), chosen to minimise the
largest fraction of any host's usable memory that its weights plus latent KV cache at
`context` tokens would take. Unequal hosts get proportionally unequal layer counts.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

from k2mlx.errors import ConfigError

GIB = 1024**3


@dataclass
class Sizes:
    """Exact parameter counts and bytes of one model at one quantization rule."""

    total_params: int
    active_params: int
    embed_bytes: int  # model.embed_tokens (first stage)
    head_bytes: int  # model.norm + lm_head (last stage)
    layer_bytes: list[int] = field(default_factory=list)  # per decoder layer
    layer_params: list[int] = field(default_factory=list)
    kv_bytes_per_token_layer: int = 0  # latent cache, bf16
    bits: int = 4
    group_size: int = 64

    @property
    def weight_bytes(self) -> int:
        return self.embed_bytes + self.head_bytes + sum(self.layer_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * len(self.layer_bytes)


def _default_factory(args, mla_weights: str = "kv_b"):
    from k2mlx.model.k2 import Model

    return Model(args, mla_weights=mla_weights)


def measure(args, bits: int = 4, group_size: int = 64, class_bits: dict | None = None,
            model_factory=None, kv_dtype_bytes: int = 2, paths: dict | None = None,
            mla_weights: str = "kv_b") -> Sizes:
    """Count params and bytes of a lazily built model (bits >= 16: keep everything bf16).

    paths: per-module entries of an MLX `quantization` ({path: {bits, group_size} | False});
    K2.5-family `language_model.` keys are accepted. mla_weights: the checkpoint's MLA layout
    ("kv_b", or mlx-lm's "split" embed_q/unembed_out, which quantizes along other axes)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from k2mlx.loading.formats.mlx import rule_predicate, rule_quantization, text_quantization
    from k2mlx.loading.shards import layer_of

    paths = text_quantization(paths)
    model = model_factory(args) if model_factory else _default_factory(args, mla_weights)
    n_layers = args.num_hidden_layers
    layer_params = [0] * n_layers
    total = routed = 0
    for name, p in tree_flatten(model.parameters()):
        total += p.size
        if ".switch_mlp." in name:
            routed += p.size
        i = layer_of(name)
        if i is not None:
            layer_params[i] += p.size
    experts = args.n_routed_experts or 0
    active = total - (routed - routed * args.num_experts_per_tok // experts if experts else 0)

    model.set_dtype(mx.bfloat16)
    if (bits and bits < 16) or any(b and b < 16 for b in (class_bits or {}).values()) or paths:
        rule = rule_quantization(bits, group_size, class_bits, paths=paths)
        nn.quantize(model, class_predicate=rule_predicate(rule))
    layer_bytes = [0] * n_layers
    embed = head = 0
    keep_f32 = getattr(model, "cast_predicate", None)  # the loader keeps e.g. the router bias float32
    for name, p in tree_flatten(model.parameters()):
        nbytes = p.size * 4 if keep_f32 is not None and not keep_f32(name) else p.nbytes
        i = layer_of(name)
        if i is not None:
            layer_bytes[i] += nbytes
        elif "embed_tokens" in name:
            embed += nbytes
        else:
            head += nbytes
    return Sizes(total, active, embed, head, layer_bytes, layer_params,
                 args.latent_dim * kv_dtype_bytes, bits, group_size)


@functools.lru_cache(maxsize=16)
def _measure_cached(config_json: str, bits: int, group_size: int, class_bits_json: str, paths_json: str,
                    mla_weights: str = "kv_b") -> Sizes:
    from k2mlx.config import ModelArgs

    return measure(ModelArgs.from_dict(json.loads(config_json)), bits, group_size,
                   json.loads(class_bits_json) or None, paths=json.loads(paths_json) or None,
                   mla_weights=mla_weights)


def sizes_for(args, bits: int = 4, group_size: int = 64, class_bits: dict | None = None,
              paths: dict | None = None, mla_weights: str = "kv_b") -> Sizes:
    """`measure`, cached per (config, rule): split_layers and the CLI ask repeatedly."""
    return _measure_cached(json.dumps(args.to_dict(), sort_keys=True, default=str), bits, group_size,
                           json.dumps(class_bits or {}, sort_keys=True), json.dumps(paths or {}, sort_keys=True),
                           mla_weights)


def os_reserve_gb(memory_gb: float) -> float:
    """Memory left to macOS and other apps: 1/16 of RAM, at least 4 GiB (32 GiB on 512 GiB)."""
    return max(4.0, memory_gb / 16)


def wired_limit_mb(memory_gb: float) -> int:
    """Value for `sudo sysctl iogpu.wired_limit_mb=...`: all RAM but the OS reserve (0 when the
    reserve takes it all, never negative)."""
    return max(0, int((memory_gb - os_reserve_gb(memory_gb)) * 1024))


def usable_bytes(memory_gb: float, headroom: float = 0.05) -> int:
    """Bytes a plan may fill: the wired limit less `headroom` for activations and buffers."""
    return int(wired_limit_mb(memory_gb) * 1024**2 * (1 - headroom))


def _split(costs: list[int], first_extra: int, last_extra: int, capacities: list[int]) -> list[range]:
    """Contiguous partition of layers minimising max(load_h / capacity_h); exact DP.

    Each host gets at least one layer. Ties prefer giving earlier hosts more layers."""
    n, hosts = len(costs), len(capacities)
    if hosts < 1:
        raise ConfigError("need at least one host")
    if hosts > n:
        raise ConfigError(f"{hosts} hosts but the model has only {n} layers")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def ratio(h, a, b):  # host h holds layers a..b-1
        load = prefix[b] - prefix[a] + (first_extra if h == 0 else 0) + (last_extra if h == hosts - 1 else 0)
        return load / max(capacities[h], 1)  # finite for a host the OS reserve fills: it still gets one layer

    # best[h][b]: minimal worst ratio placing layers 0..b-1 on hosts 0..h
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(hosts)]
    cut = [[0] * (n + 1) for _ in range(hosts)]
    for b in range(1, n + 1):
        best[0][b] = ratio(0, 0, b)
    for h in range(1, hosts):
        for b in range(h + 1, n + 1):
            for a in range(h, b):
                r = max(best[h - 1][a], ratio(h, a, b))
                if r < best[h][b] - 1e-12 or (abs(r - best[h][b]) <= 1e-12 and a > cut[h][b]):
                    best[h][b], cut[h][b] = r, a
    bounds, b = [], n
    for h in range(hosts - 1, 0, -1):
        a = cut[h][b]
        bounds.append(range(a, b))
        b = a
    bounds.append(range(0, b))
    return bounds[::-1]


def split_layers(args, memories_gb, bits: int = 4, group_size: int = 64, context: int = 0,
                 class_bits: dict | None = None, paths: dict | None = None,
                 mla_weights: str = "kv_b") -> list[range]:
    """Memory-balanced contiguous layer ranges, one per host (see the module docstring).

    args: ModelArgs; memories_gb: RAM of each host in GiB, in pipeline order; bits/group_size:
    the quantization the hosts will load (bits 16 = bf16); context: tokens of latent KV cache
    to reserve per host for its own layers; class_bits / paths: per-class bits and per-module
    MLX quantization entries (as in convert); mla_weights: the checkpoint's MLA layout."""
    s = sizes_for(args, bits, group_size, class_bits, paths, mla_weights)
    kv_layer = s.kv_bytes_per_token_layer * context
    costs = [b + kv_layer for b in s.layer_bytes]
    return _split(costs, s.embed_bytes, s.head_bytes, [usable_bytes(m) for m in memories_gb])


def make_plan(args, memories_gb, bits: int = 4, group_size: int = 64, context: int = 0,
              class_bits: dict | None = None, paths: dict | None = None, mla_weights: str = "kv_b") -> dict:
    """Everything `k2mlx plan` prints, as one JSON-able dict."""
    s = sizes_for(args, bits, group_size, class_bits, paths, mla_weights)
    ranges = split_layers(args, memories_gb, bits, group_size, context, class_bits, paths, mla_weights)
    hosts = []
    for h, (r, mem) in enumerate(zip(ranges, memories_gb)):
        weights = sum(s.layer_bytes[i] for i in r) + (s.embed_bytes if h == 0 else 0) + (
            s.head_bytes if h == len(ranges) - 1 else 0)
        kv = s.kv_bytes_per_token_layer * context * len(r)
        usable = usable_bytes(mem)
        hosts.append({
            "host": h, "memory_gb": mem, "layers": [r.start, r.stop - 1], "num_layers": len(r),
            "weight_bytes": weights, "kv_bytes": kv, "bytes": weights + kv, "usable_bytes": usable,
            "wired_limit_mb": wired_limit_mb(mem), "fits": weights + kv <= usable,
            # never negative: what is left, or what is missing
            "headroom_bytes": max(0, usable - weights - kv), "short_bytes": max(0, weights + kv - usable),
        })
    return {
        "model_type": args.model_type, "num_layers": args.num_hidden_layers,
        "bits": bits, "group_size": group_size, "class_bits": class_bits or {}, "context": context,
        "total_params": s.total_params, "active_params": s.active_params,
        "weight_bytes": s.weight_bytes, "embed_bytes": s.embed_bytes, "head_bytes": s.head_bytes,
        "layer_bytes": s.layer_bytes,
        "kv_bytes_per_token": s.kv_bytes_per_token, "kv_bytes": s.kv_bytes_per_token * context,
        "hosts": hosts, "fits": all(h["fits"] for h in hosts),
        "short_bytes": sum(h["short_bytes"] for h in hosts),
    }
