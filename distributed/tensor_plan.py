"""`k2mlx plan --parallel tensor`: what each host holds when every rank has 1/N of every layer.

Exact, like the pipeline plan: the model is built lazily (no weights), sharded as rank 0 would
be (`tensor.shard_model`, heads and intermediate dimensions split; MLA latent projections,
router, embedding and head replicated) and measured by the loader's own `measure`. The latent
KV cache is replicated too, so every rank reserves the whole cache for the context."""
from __future__ import annotations


def tensor_plan(plan: dict, margs, memories_gb: list[float], bits: int, group_size: int, context: int,
                class_bits: dict | None = None, paths: dict | None = None, mla_weights: str = "kv_b") -> dict:
    """`plan` (from loading.plan.make_plan) with per-host rows for tensor parallelism."""
    from k2mlx.loading.plan import measure, usable_bytes, wired_limit_mb

    n = len(memories_gb)

    def sharded(a):
        from k2mlx.model.k2 import Model

        from .tensor import shard_model

        m = Model(a, mla_weights=mla_weights)
        shard_model(m, 0, n, group=None, materialize=False)
        return m

    s = measure(margs, bits, group_size, class_bits, model_factory=sharded, paths=paths, mla_weights=mla_weights)
    weights = s.weight_bytes
    kv = s.kv_bytes_per_token * context
    hosts = []
    for h, mem in enumerate(memories_gb):
        usable = usable_bytes(mem)
        hosts.append({"host": h, "memory_gb": mem, "layers": [0, margs.num_hidden_layers - 1],
                      "num_layers": margs.num_hidden_layers, "share": f"1/{n}", "weight_bytes": weights,
                      "kv_bytes": kv, "bytes": weights + kv, "usable_bytes": usable,
                      "wired_limit_mb": wired_limit_mb(mem), "fits": weights + kv <= usable,
                      "headroom_bytes": max(0, usable - weights - kv),  # never negative, as in make_plan
                      "short_bytes": max(0, weights + kv - usable)})
    return {**plan, "parallel": "tensor", "hosts": hosts, "fits": all(h["fits"] for h in hosts),
            "short_bytes": sum(h["short_bytes"] for h in hosts)}
