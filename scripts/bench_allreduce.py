#!/usr/bin/env python
"""Latency of one all-reduce of K2's hidden state over MLX's ring backend (two ranks, loopback).

Tensor parallelism costs two all_sums per layer per forward (K2: 61 layers -> 122 per token);
the pipeline costs one send of the hidden state per stage boundary plus the logits back. This
measures both primitives at decode shapes ([B, 7168]) and prints the median and p90 over many
calls, plus 122 x the all_sum median (the collective time one K2 token would spend).

    python scripts/bench_allreduce.py                  # B = 1 and 8, bfloat16 and float32
    python scripts/bench_allreduce.py --iters 2000 --hidden 7168 --batch 1

Loopback numbers bound the software cost (MLX + TCP stack); a Thunderbolt link adds its wire
time, and JACCL (RDMA) replaces the TCP stack (published: ~30 us per small message).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(a) -> None:
    import time

    import mlx.core as mx

    g = mx.distributed.init(strict=True, backend="ring")
    rank = g.rank()
    out = []
    for dtype in a.dtypes.split(","):
        for B in [int(b) for b in a.batch.split(",")]:
            x = mx.ones((B, a.hidden), dtype=getattr(mx, dtype))
            mx.eval(x)

            def reduce_once():
                mx.eval(mx.distributed.all_sum(x, group=g))

            def send_once():  # one hop there and one back: the pipeline's per-boundary cost x2
                if rank == 0:
                    mx.eval(mx.distributed.send(x, 1, group=g))
                    mx.eval(mx.distributed.recv_like(x, 1, group=g))
                else:
                    mx.eval(mx.distributed.recv_like(x, 0, group=g))
                    mx.eval(mx.distributed.send(x, 0, group=g))

            row = {"dtype": dtype, "batch": B, "hidden": a.hidden, "bytes": x.nbytes}
            for name, fn in (("all_sum", reduce_once), ("send_recv_roundtrip", send_once)):
                for _ in range(a.warmup):
                    fn()
                ts = []
                for _ in range(a.iters):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                ts.sort()
                row[name] = {"median_us": ts[len(ts) // 2] * 1e6, "p90_us": ts[int(len(ts) * 0.9)] * 1e6}
            out.append(row)
    if rank == 0:
        print(json.dumps(out), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168, help="K2's hidden size (default 7168)")
    ap.add_argument("--batch", default="1,8", help="rows per all-reduce (decode batch), comma list")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--layers", type=int, default=61, help="layers per forward (K2: 61)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    ports = [_free_port(), _free_port()]
    fd, hostfile = tempfile.mkstemp(prefix="k2mlx-bench-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
    argv = [sys.executable, __file__, "--worker", "--hidden", str(a.hidden), "--batch", a.batch,
            "--dtypes", a.dtypes, "--iters", str(a.iters), "--warmup", str(a.warmup)]
    try:
        procs = [subprocess.Popen(argv, env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile,
                                             "MLX_WORLD_SIZE": "2"}, stdout=subprocess.PIPE, text=True)
                 for r in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        os.unlink(hostfile)
    if any(p.returncode for p in procs):
        print("a rank failed", file=sys.stderr)
        return 1
    rows = json.loads(outs[0].strip().splitlines()[-1])
    print(f"{'dtype':9} {'B':>3} {'bytes':>7}  {'all_sum med':>11} {'p90':>8}  {'send+recv med':>13} {'p90':>8}"
          f"  {2 * a.layers} all_sums")
    for r in rows:
        s, p = r["all_sum"], r["send_recv_roundtrip"]
        print(f"{r['dtype']:9} {r['batch']:>3} {r['bytes']:>7}  {s['median_us']:>9.1f}us {s['p90_us']:>6.1f}us"
              f"  {p['median_us']:>11.1f}us {p['p90_us']:>6.1f}us  {2 * a.layers * s['median_us'] / 1000:>7.2f} ms")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
