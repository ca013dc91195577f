"""`k2mlx selftest --bench`: a short table to paste into a bug report. The machine (chip,
memory, OS, MLX version), the MoE path `auto` chose, and decode tokens/s per MoE path for the
default model and for a K2-shaped 4-bit layer stack: K2's real per-layer shapes (MLA
attention with 64 heads, q_lora 1536, kv_lora 512; hidden 7168; 8 routed experts of size 2048
per token plus one shared expert), random weights, few layers, E routed experts instead of 384
and a 1024-token vocabulary (neither changes a per-token shape except the router's width)."""
from __future__ import annotations

import time

K2_SHAPES = dict(
    hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=64,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=2.827,
)


def k2_shaped_model(layers=2, experts=16, bits=4, group_size=32, dtype=None, seed=0):
    """A Model of `layers` K2-shaped MoE decoder layers with random `bits`-bit weights
    (dtype: activations, scales and norms; default bfloat16)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from k2mlx.config import ModelArgs
    from k2mlx.model.k2 import Model

    dtype = dtype or mx.bfloat16
    args = ModelArgs(vocab_size=1024, num_hidden_layers=layers, n_routed_experts=experts,
                     first_k_dense_replace=0, max_position_embeddings=4096, **K2_SHAPES)
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(dtype)
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("mlp.gate"))
    # every quantized module gets random codes, scales and biases before anything is
    # evaluated, so the float placeholders (E x 44M floats per layer) are never computed
    key = mx.random.key(seed)
    scale = 2.0 / (7168 ** 0.5 * (2**bits - 1))
    for name, m in model.named_modules():
        if "scales" not in m or "weight" not in m:
            continue
        key, k1, k2, k3 = mx.random.split(key, 4)
        shape = m["weight"].shape
        hi = mx.random.randint(0, 1 << 16, shape, key=k1).astype(mx.uint32)
        lo = mx.random.randint(0, 1 << 16, shape, key=k2).astype(mx.uint32)
        s = (mx.random.uniform(0.5, 1.5, m["scales"].shape, key=k3) * scale).astype(dtype)
        m.update({"weight": (hi << 16) | lo, "scales": s,
                  "biases": (-s.astype(mx.float32) * (2 ** (bits - 1))).astype(dtype)})
    for layer in model.layers:
        g = layer.mlp.gate
        g.weight = (mx.random.normal(g.weight.shape) * 0.02).astype(dtype)
        g.e_score_correction_bias = mx.random.normal(g.e_score_correction_bias.shape) * 0.01
        mx.eval(layer.parameters())
    mx.eval([v for _, v in tree_flatten(model.parameters())])
    model.eval()
    return model


def decode_rate(model, steps=4, prompt=1) -> float:
    """Greedy decode tokens/s after a short prefill (the first step is not timed)."""
    import mlx.core as mx

    cache = model.make_cache()
    tok = mx.array([[1 + i for i in range(prompt)]])
    logits = model(tok, cache)
    tok = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tok)
    t0 = None
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)
        mx.eval(tok)
    return steps / (time.perf_counter() - t0)


def machine() -> dict:
    import os
    import platform

    import mlx.core as mx

    from k2mlx.kernels.launch import gpu_backend
    from k2mlx.kernels.policy import chip, os_name

    try:
        mem = mx.device_info().get("memory_size")
    except (AttributeError, RuntimeError):
        mem = None
    if not mem and hasattr(os, "sysconf"):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"chip": chip(), "memory_gb": round(mem / 2**30, 1) if mem else None, "os": os_name(),
            "python": platform.python_version(), "mlx": mx.__version__,
            "backend": gpu_backend() or "cpu"}


def paths_here() -> list[str]:
    from k2mlx.kernels.launch import gpu_backend

    return ["switch", "reference"] + (["kernel"] if gpu_backend() else [])


def bench(model_path: str, layers=None, experts=None, steps=None) -> dict:
    """Decode tok/s per MoE path for the model at `model_path` and for the K2-shaped stack."""
    import mlx.core as mx

    from k2mlx import load
    from k2mlx.errors import K2Error
    from k2mlx.kernels.launch import gpu_backend
    from k2mlx.kernels.policy import configure, moe_layers

    gpu = gpu_backend() is not None
    layers = layers or (4 if gpu else 1)
    experts = experts or (32 if gpu else 8)
    steps = steps or (16 if gpu else 2)
    # MLX's CPU 4-bit kernels are ~10x slower in bf16 than in float32 (0.45 vs 4.8 s for 8
    # experts of 7168 -> 2048 on this project's Linux box): the CPU stack runs in float32
    dtype = mx.bfloat16 if gpu else mx.float32
    dname = "bf16" if gpu else "float32"
    out = {"machine": machine(), "models": []}
    model, _ = load(model_path)
    stack = k2_shaped_model(layers=layers, experts=experts, dtype=dtype)
    from pathlib import Path

    for name, m, n in ((f"default ({Path(model_path).name})", model, max(steps, 16)),
                       (f"K2 stack {layers}L E{experts} {dname}", stack, steps)):
        plan = configure(m, "auto")
        chosen = "; ".join(f"{d.experts}/{d.router} ({d.source})" for d in plan.decisions)
        rates, notes = {}, []
        for path in paths_here():
            try:
                configure(m, path)
            except K2Error as e:  # e.g. the kernels cannot run these weights
                rates[path] = None
                notes.append(f"{path}: {e}")
                continue
            rate = decode_rate(m, n)
            layers_ = [moe.plan for _, moe in moe_layers(m)]
            # a kernel that failed at its first call fell back to switch: not the kernel's rate
            rates[path] = rate if path != "kernel" or all(p.experts_ran for p in layers_) else None
            if rates[path] is None:
                notes.append("kernel: fell back to switch at its first call (see the warning)")
        configure(m, "auto")
        out["models"].append({"model": name, "auto": chosen, "why": "; ".join([plan.summary(), *notes]),
                              "tok_s": rates, "steps": n})
    del stack
    mx.clear_cache()
    return out
