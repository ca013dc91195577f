#!/usr/bin/env python
"""Prefill over two ranks (loopback, MLX ring backend): pipelined chunks against the same two ranks
one chunk at a time, one process, and mlx-lm's own pipeline, all in one run.

    python scripts/bench_prefill.py [--lengths 1500,4000] [--comm-ms 1.0]

Prints time to first token (one request, no prefix cache) as prefill tok/s, and the two-host
projection from the pipelined run's per-stage CPU times: a two-stage flow shop where stage r
starts chunk i once it finished chunk i-1 and (r > 0) stage r-1 sent chunk i, plus `--comm-ms`
per hop. Wall-clock figures are this machine's: two busy ranks on its 2 shared cores get about
1.5x one core, so about 1.3-1.45x is reachable here; the projection is for two hosts. On Linux,
run it with OpenBLAS preloaded and one BLAS thread per process (two ranks, one core each):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_NUM_THREADS=1 \
        python scripts/bench_prefill.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


REPEATS = 2


def one_process(model_path: str, lengths: list[int], chunk: int | None) -> dict:
    from k2mlx import load
    from k2mlx.distributed.scenarios import prefill_bench

    model, tok = load(model_path)
    out = tempfile.mktemp(suffix=".json")
    prefill_bench(model, tok, lengths=lengths, chunk=chunk, out=out, repeats=REPEATS)
    with open(out) as f:
        return json.load(f)


def two_ranks(model_path: str, lengths: list[int], chunk: int | None, blocking: bool) -> dict:
    out = tempfile.mktemp(suffix=".json")
    args = {"lengths": lengths, "chunk": chunk, "out": out, "blocking": blocking, "repeats": REPEATS}
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1", "--model",
           model_path, "--role", "k2mlx.distributed.scenarios:prefill_bench", "--role-args", json.dumps(args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"two-rank run failed:\n{p.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def mlxlm_rank_main(model_path: str, lengths: list[int], out: str) -> int:
    """One rank of mlx-lm's own pipeline (DeepseekV3Model.pipeline), prefilling as its
    generate does (chunks of 2048, the cache evaluated after each)."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    group = mx.distributed.init(strict=True, backend="ring")
    model = load_model(Path(model_path))[0]
    model.model.pipeline(group)
    res = {}
    for n in lengths:
        best = None
        for r in range(REPEATS + 1):
            toks = mx.array([[(7 * i + 3 + r) % 300 + 5 for i in range(n)]], dtype=mx.int32)
            cache = make_prompt_cache(model)
            t0 = time.perf_counter()
            rest = toks
            while rest.shape[1] > 1:
                k = min(2048, rest.shape[1] - 1)
                model(rest[:, :k], cache=cache)
                mx.eval([c.state for c in cache])
                rest = rest[:, k:]
            mx.eval(mx.argmax(model(rest, cache=cache)[:, -1], axis=-1))
            dt = time.perf_counter() - t0
            if r and (best is None or dt < best):
                best = dt
        res[str(n)] = {"prefill_s": best, "tok_s": n / best}
    if group.rank() == 0:
        with open(out, "w") as f:
            json.dump({"runs": res}, f)
    return 0


def mlxlm_pipeline(model_path: str, lengths: list[int]) -> dict:
    from bench_pipeline import run_mlxlm_ranks

    return run_mlxlm_ranks(__file__, ["--model", model_path, "--lengths", ",".join(map(str, lengths)),
                                      "--repeats", str(REPEATS)], timeout=1800)


def projection(run: dict, comm_s: float) -> tuple[float, float]:
    """(serial, pipelined) seconds on two hosts from the per-step CPU seconds of each stage:
    serial runs every step through both stages before the next (+2 hops each); pipelined is the
    two-stage flow shop (stage 1 starts step i once it finished i-1 and stage 0 sent i)."""
    by: dict = {}
    for st in run["timeline"]:  # rank 0 keeps a submit and a collect record per step: add them
        d = by.setdefault(st["rank"], {})
        for s in st["steps"]:
            d[s[0]] = d.get(s[0], 0.0) + s[3]
    steps = sorted(set(by[0]) & set(by[1]))
    f0 = f1 = 0.0
    for s in steps:
        f0 += by[0][s]
        f1 = max(f1, f0 + comm_s) + by[1][s]
    serial = sum(by[0][s] + by[1][s] + 2 * comm_s for s in steps)
    return serial, f1 + comm_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: a float32 bench model built in /tmp)")
    ap.add_argument("--lengths", default="1500,4000")
    ap.add_argument("--comm-ms", type=float, default=1.0, help="per-hop latency+transfer for the projection")
    ap.add_argument("--skip-mlxlm", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per case after one warm-up (best kept)")
    ap.add_argument("--mlxlm-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    global REPEATS
    REPEATS = max(1, args.repeats)
    if args.mlxlm_rank:
        return mlxlm_rank_main(args.model, lengths, args.out)
    from bench_pipeline import build_model

    path = args.model or build_model(os.path.join(tempfile.gettempdir(), "k2mlx-bench-pipeline"), 8, 512)
    t0 = time.time()
    single = one_process(path, lengths, None)
    single256 = one_process(path, lengths, 256)
    piped = two_ranks(path, lengths, None, blocking=False)
    blocking = two_ranks(path, lengths, piped["chunk"], blocking=True)
    ml = None if args.skip_mlxlm else mlxlm_pipeline(path, lengths)
    print(f"prefill, one request, time to first token ({time.time() - t0:.0f} s for the run); chunk: one process "
          f"{single['chunk']}, two ranks {piped['chunk']}")
    print("\nwall clock here (2 shared cores; tok/s):")
    print("| prompt | one process | one process, chunk 256 | two ranks, one chunk at a time | two ranks, pipelined | "
          "mlx-lm pipeline | pipelined / one process |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        k = str(n)
        mlt = f"{ml['runs'][k]['tok_s']:.0f}" if ml else "-"
        print(f"| {n} | {single['runs'][k]['tok_s']:.0f} | {single256['runs'][k]['tok_s']:.0f} | "
              f"{blocking['runs'][k]['tok_s']:.0f} | {piped['runs'][k]['tok_s']:.0f} | {mlt} | "
              f"{piped['runs'][k]['tok_s'] / single['runs'][k]['tok_s']:.2f}x |")
    print(f"\ntwo hosts, projected from CPU seconds ({args.comm_ms:g} ms per hop): one process = its measured CPU "
          "seconds; two hosts = the ranks' per-step CPU seconds scheduled serially or as a flow shop")
    print("| prompt | one process s | two hosts, one chunk at a time s | two hosts, pipelined s | "
          "speed-up, one chunk at a time | speed-up, pipelined |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        k = str(n)
        one = single["runs"][k]["cpu_s"]
        serial = projection(blocking["runs"][k], args.comm_ms / 1000)[0]
        piped_s = projection(piped["runs"][k], args.comm_ms / 1000)[1]
        print(f"| {n} | {one:.2f} | {serial:.2f} | {piped_s:.2f} | {one / serial:.2f}x | {one / piped_s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
