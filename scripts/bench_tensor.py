#!/usr/bin/env python
"""Tensor parallelism benchmark: one stream's decode, one process vs two tensor-parallel ranks,
k2mlx and mlx-lm side by side in one run (loopback, MLX ring backend).

- k2mlx, one process: `LocalSteps` over the loaded model (the raw step loop, no engine).
- k2mlx, two ranks: `--parallel tensor` through the launcher (`TensorModel` on rank 0, every
  step sent to the worker, two all_sums per layer).
- mlx-lm, one process and two ranks: its own DeepseekV3 with `model.shard(group)` (its tensor
  parallelism: every rank runs the loop), the same greedy steps.

    python scripts/bench_tensor.py                  # builds a float32 "bench" tiny K2 in /tmp
    python scripts/bench_tensor.py --pin 0,1 --steps 64

`--pin 0,1` puts the one-process runs on core 0 and rank r on core r: each rank gets one core,
as each host would. The figures are wall clock on this machine; the loopback TCP ring costs
what it costs here (docs/BENCHMARKS.md has the all_sum latency), not what JACCL would.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_pipeline as bp  # noqa: E402  (its checkpoint builder, mlx-lm decode loop and rank launcher)


def k2mlx_tensor(model_path: str, steps: int, prompt_len: int, repeats: int, pin: str | None) -> dict:
    out = tempfile.mktemp(suffix=".json")
    args = {"streams": 1, "prompt_len": prompt_len, "steps": steps, "out": out, "repeats": repeats}
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1",
           "--model", model_path, "--parallel", "tensor", "--role", "k2mlx.distributed.scenarios:decode_bench",
           "--role-args", json.dumps(args)]
    env = dict(os.environ, **({"K2MLX_PIN_CPUS": pin} if pin else {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"two-rank tensor run failed:\n{p.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def mlxlm_rank_main(model_path: str, steps: int, prompt_len: int, out: str, pin: str | None) -> int:
    """One rank of mlx-lm's own tensor parallelism (`Model.shard`): every rank runs the loop."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    if pin:  # before init: the ring's threads start there and keep the affinity they start with
        os.sched_setaffinity(0, {int(pin.split(",")[int(os.environ["MLX_RANK"])])})
    group = mx.distributed.init(strict=True, backend="ring")
    model = load_model(Path(model_path), lazy=True)[0]
    model.shard(group)
    mx.eval(model.parameters())
    res = bp.mlxlm_decode(model, steps, prompt_len)
    if group.rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    return 0


def tensor_cpu(res: dict) -> tuple[float, float]:
    """Median CPU seconds per step of rank 0 and rank 1, from the run's timeline."""
    by = {st["rank"]: st["steps"] for st in res["timeline"]}
    return tuple(bp._median([s[3] for s in by.get(r, []) if len(s) > 3 and s[2] > 0]) for r in (0, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: build a bench tiny K2)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the built checkpoint")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size of the built checkpoint")
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration and round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the four configurations")
    ap.add_argument("--pin", default=None, metavar="CPU0,CPU1",
                    help="one-process runs on CPU0, rank r on CPU r (Linux): one core per 'host'")
    ap.add_argument("--mlxlm-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mlxlm_rank:
        return mlxlm_rank_main(a.model, a.steps, a.prompt_len, a.out, a.pin)
    path = a.model or bp.build_model(os.path.join(tempfile.gettempdir(), f"k2mlx-bench-{a.layers}x{a.hidden}"),
                                     a.layers, a.hidden)
    if a.pin:  # the one-process runs (this process) on the first core
        os.sched_setaffinity(0, {int(a.pin.split(",")[0])})
    runs: dict[str, list[dict]] = {"k1": [], "k2": [], "m1": [], "m2": []}
    for _ in range(a.rounds):  # interleaved, so a burst of other load hits every configuration alike
        runs["k1"].append(bp.single(path, 1, a.steps, a.prompt_len, a.repeats))
        runs["k2"].append(k2mlx_tensor(path, a.steps, a.prompt_len, a.repeats, a.pin))
        runs["m1"].append(bp.mlxlm_single(path, a.steps * a.repeats, a.prompt_len))
        runs["m2"].append(bp.run_mlxlm_ranks(__file__, ["--model", path, "--steps", str(a.steps * a.repeats),
                                                        "--prompt-len", str(a.prompt_len)]
                                             + (["--pin", a.pin] if a.pin else [])))
    # per configuration, the round with the median tok/s
    k1, k2, m1, m2 = (sorted(runs[k], key=lambda r: r["tok_s_median"])[len(runs[k]) // 2]
                      for k in ("k1", "k2", "m1", "m2"))
    c0, c1 = tensor_cpu(k2)
    print(f"model: {path}; one stream, greedy decode, {a.steps + 1} timed steps, prompt {a.prompt_len} tokens"
          + (f", pinned to cores {a.pin}" if a.pin else "") + f"; wall clock on this machine; median of "
          f"{a.rounds} interleaved rounds")
    for k, what in (("k1", "k2mlx one process"), ("k2", "k2mlx two ranks"), ("m1", "mlx-lm one process"),
                    ("m2", "mlx-lm two ranks")):
        print(f"  {what}: tok/s per round " + ", ".join(f"{r['tok_s_median']:.1f}" for r in runs[k]))
    print("| | one process tok/s (median step) | two tensor ranks tok/s (median step) | two / one |")
    print("|---|---|---|---|")
    print(f"| k2mlx | {k1['tok_s_median']:.1f} | {k2['tok_s_median']:.1f} | "
          f"{k2['tok_s_median'] / k1['tok_s_median']:.2f}x |")
    print(f"| mlx-lm (`Model.shard`) | {m1['tok_s_median']:.1f} | {m2['tok_s_median']:.1f} | "
          f"{m2['tok_s_median'] / m1['tok_s_median']:.2f}x |")
    print(f"k2mlx CPU per token: one process {k1['cpu_per_forward_s'] * 1e3:.1f} ms; two tensor ranks "
          f"rank 0 {c0 * 1e3:.1f} ms, rank 1 {c1 * 1e3:.1f} ms (each computes half of every layer)")
    print(f"mlx-lm CPU per token: one process {m1['cpu_per_token_s'] * 1e3:.1f} ms; "
          f"tensor rank 0 {m2['cpu_per_token_s'] * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip teardown: MLX's ring threads may still hold sockets
