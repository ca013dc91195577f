#!/usr/bin/env python
"""Expert-dispatch benchmark: one K2-shaped MoE layer (routed experts, 4-bit affine), k2mlx's
dispatch vs mlx-lm's SwitchGLU (mlx_lm.models.switch_layers) on the same weights, in one run,
at 1, 4, 16 and 64 tokens, with the bytes of expert weights each approach reads per call.

    python scripts/bench_moe.py                    # scaled down for the Linux CPU build
    python scripts/bench_moe.py --preset k2        # K2's real layer: 384 x (7168 -> 2048)

Paths timed: `mlx-lm` (SwitchGLU + weighted sum; it sorts pairs by expert only from 64 pairs
up), `reference` (k2mlx: always grouped, gather_qmm with sorted_indices), and `kernel` (k2mlx
Metal/CUDA kernels) where MLX runs on a GPU. Weights are random packed uint32 values with
random scales/biases: a valid MLX affine layout without quantizing 16 GB of floats first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

PRESETS = {
    "cpu": dict(experts=384, hidden=1024, inter=256, top_k=8),
    "k2": dict(experts=384, hidden=7168, inter=2048, top_k=8),
}


def quantized_switch(E, out_dims, in_dims, group_size, bits, dtype, key):
    """An mlx-lm QuantizedSwitchLinear holding random packed weights."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from k2mlx.kernels.checks import random_packed

    m = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(m)
    m.group_size, m.bits, m.mode, m.global_scale = group_size, bits, "affine", None
    p = random_packed(E, out_dims, in_dims, group_size, bits, dtype, seed=key)
    m.weight, m.scales, m.biases = p.weight, p.scales, p.biases
    m.freeze()
    return m


def build_layer(E, D, I, group_size, bits, dtype, seed=0):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU

    sw = SwitchGLU.__new__(SwitchGLU)
    nn.Module.__init__(sw)
    sw.gate_proj = quantized_switch(E, I, D, group_size, bits, dtype, 3 * seed)
    sw.up_proj = quantized_switch(E, I, D, group_size, bits, dtype, 3 * seed + 1)
    sw.down_proj = quantized_switch(E, D, I, group_size, bits, dtype, 3 * seed + 2)
    sw.activation = SwiGLU()
    mx.eval(sw.parameters())
    return sw


def expert_bytes(D, I, group_size, bits, scale_bytes):
    per_proj = I * D * bits // 8 + 2 * (I * D // group_size) * scale_bytes
    return 3 * per_proj


def time_call(fn, iters, warmup=2):
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn())
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tokens", default="1,4,16,64")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=0, help="timed calls per point (default: by backend)")
    p.add_argument("--rows", default="4", help="kernel path: output rows per simdgroup (comma list to compare)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from k2mlx.kernels import launch
    from k2mlx.kernels.dispatch import moe_forward
    from k2mlx.kernels.launch import TT, gpu_backend

    cfg = PRESETS[args.preset]
    E, D, I, k = cfg["experts"], cfg["hidden"], cfg["inter"], cfg["top_k"]
    dtype = getattr(mx, args.dtype)
    backend = gpu_backend()
    iters = args.iters or (50 if backend else 5)
    console = Console(stderr=True)
    console.print(f"device {mx.default_device()} ({backend or 'cpu'}), mlx {mx.__version__}; "
                  f"{E} experts, hidden {D}, expert size {I}, top-{k}, {args.bits}-bit g{args.group_size}, "
                  f"{args.dtype}; median of {iters}")
    sw = build_layer(E, D, I, args.group_size, args.bits, dtype)
    eb = expert_bytes(D, I, args.group_size, args.bits, 2 if dtype != mx.float32 else 4)
    rng = np.random.default_rng(0)

    rows_opts = [int(r) for r in args.rows.split(",")]
    kernels = {("kernel" if len(rows_opts) == 1 else f"kernel r{r}"): r for r in rows_opts}
    paths = ["mlx-lm", "reference"] + (list(kernels) if backend else [])
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = (mx.random.normal((n, D), key=mx.random.key(n)) * 0.5).astype(dtype)
        inds = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32))
        w = mx.random.uniform(shape=(n, k), key=mx.random.key(n + 1))
        counts = np.bincount(np.array(inds).reshape(-1), minlength=E)
        used = int((counts > 0).sum())
        tiles = int(np.ceil(counts[counts > 0] / TT).sum())

        def mlx_lm_call():
            y = sw(x, inds)
            return (y * w[..., None]).sum(axis=-2).astype(y.dtype)

        def kernel_call(rows):
            def call():
                launch.ROWS = rows  # read at call time by the kernel launch
                return moe_forward(x, inds, w, sw, path="kernel", backend=backend)
            return call

        fns = {"mlx-lm": mlx_lm_call,
               "reference": lambda: moe_forward(x, inds, w, sw, path="reference"),
               **{name: kernel_call(r) for name, r in kernels.items()}}
        want = np.array(mlx_lm_call().astype(mx.float32))
        scale = float(np.abs(want).max()) or 1.0
        row = {"tokens": n, "pairs": n * k, "experts_used": used,
               # mlx-lm reads an expert per (token, expert) pair below 64 pairs; sorted
               # gather_qmm (and the kernels, per tile of TT tokens) read each used expert once
               "mb_per_pair": n * k * eb / 1e6 if n * k < 64 else used * eb / 1e6,
               "mb_grouped": used * eb / 1e6, "mb_kernel": tiles * eb / 1e6}
        for name in paths:
            got = np.array(fns[name]().astype(mx.float32))
            row[f"err_{name}"] = float(np.abs(got - want).max()) / scale  # relative to max |y|
            row[f"ms_{name}"] = time_call(fns[name], iters) * 1e3
        rows.append(row)
        console.print(f"  {n} tokens done")

    t = Table(title=f"MoE layer: k2mlx dispatch vs mlx-lm SwitchGLU ({backend or 'cpu'})")
    for c in ["tokens", "experts used", "MB read mlx-lm", "MB read grouped"] + [f"{p} ms" for p in paths] + ["max rel diff"]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["tokens"]), str(r["experts_used"]), f"{r['mb_per_pair']:.1f}", f"{r['mb_grouped']:.1f}",
                  *[f"{r[f'ms_{p}']:.3f}" for p in paths],
                  f"{max(r[f'err_{p}'] for p in paths):.2e}")
    Console().print(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dict(cfg, bits=args.bits, group_size=args.group_size, dtype=args.dtype,
                                      backend=backend or "cpu", iters=iters), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
