#!/usr/bin/env python
"""Pipeline benchmark: two ranks (loopback, MLX ring backend) against one process.

Prints, for one checkpoint: the engine (what `serve` runs; over two ranks it overlaps one
micro-batch group per stage) with 1/2/4 concurrent streams in one process and over two ranks;
then the raw submit loop: single-stream decode tokens/s in one process and over two ranks,
aggregate tokens/s with 2 and 4 concurrent streams (one micro-batch per stream, pipelined with
`PipelineModel.submit`), and a per-token timeline of each stage's compute and wait.

    python scripts/bench_pipeline.py                 # builds a float32 "bench" tiny K2 in /tmp
    python scripts/bench_pipeline.py --model PATH --steps 64

Numbers from the Linux CPU build are for ratios only; two ranks on one machine share its cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def build_model(path: str, layers: int, hidden: int) -> str:
    from k2mlx.tiny import make_tiny_checkpoint

    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"building a bench checkpoint in {path} ...", file=sys.stderr)
        make_tiny_checkpoint(path, preset="small", dtype="float32", seed=0, num_hidden_layers=layers,
                             hidden_size=hidden, moe_intermediate_size=hidden // 2, intermediate_size=2 * hidden,
                             n_routed_experts=16, num_experts_per_tok=4)
    return path


_MODEL = {}
PIN = None  # "0,1": the one-process run on core 0, rank r on core r (two hosts, one core each)


def single(model_path: str, streams: int, steps: int, prompt_len: int, repeats: int,
           batched: bool = False) -> dict:
    from k2mlx import load
    from k2mlx.distributed.scenarios import LocalSteps, decode_bench

    if model_path not in _MODEL:
        _MODEL[model_path] = load(model_path)[0]
    out = tempfile.mktemp(suffix=".json")
    decode_bench(LocalSteps(_MODEL[model_path]), None, streams=streams, prompt_len=prompt_len, steps=steps,
                 out=out, repeats=repeats, batched=batched)
    with open(out) as f:
        return json.load(f)


def engine_single(model_path: str, streams: int, steps: int, prompt_len: int, repeats: int) -> dict:
    """The engine in one process (its streams decode as one batch)."""
    from k2mlx import load
    from k2mlx.distributed.scenarios import engine_bench

    model, tok = load(model_path)
    out = tempfile.mktemp(suffix=".json")
    engine_bench(model, tok, streams=streams, prompt_len=prompt_len, steps=steps, out=out, repeats=repeats)
    with open(out) as f:
        return json.load(f)


def pipelined(model_path: str, streams: int, steps: int, prompt_len: int, layers, repeats: int,
              role: str = "decode_bench") -> dict:
    out = tempfile.mktemp(suffix=".json")
    args = {"streams": streams, "prompt_len": prompt_len, "steps": steps, "out": out, "repeats": repeats}
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1",
           "--model", model_path, "--role", f"k2mlx.distributed.scenarios:{role}",
           "--role-args", json.dumps(args)]
    if layers:
        cmd += ["--layers", layers]
    env = dict(os.environ)
    if PIN:
        env["K2MLX_PIN_CPUS"] = PIN  # rank r on core PIN[r]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"two-rank run failed:\n{p.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def mlxlm_decode(model, steps: int, prompt_len: int) -> dict:
    """mlx-lm's own decode loop pieces: prefill, then greedy steps; tok/s and CPU per token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = mx.array([[(7 * i + 3) % 50 + 1 for i in range(prompt_len)]], dtype=mx.int32)
    y = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    rounds, cpu = [], []
    for i in range(steps + 3):
        t, c = time.perf_counter(), time.process_time()
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        if i >= 3:  # warm-up steps not timed
            rounds.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"tok_s": len(rounds) / sum(rounds), "tok_s_median": 1 / _median(rounds),
            "tok_s_p10": 1 / sorted(rounds)[len(rounds) // 10], "cpu_per_token_s": _median(cpu)}


def mlxlm_single(model_path: str, steps: int, prompt_len: int) -> dict:
    from pathlib import Path

    from mlx_lm.utils import load_model

    return mlxlm_decode(load_model(Path(model_path))[0], steps, prompt_len)


def mlxlm_rank_main(model_path: str, steps: int, prompt_len: int, out: str) -> int:
    """One rank of mlx-lm's own pipeline (DeepseekV3Model.pipeline): every rank runs the loop."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.utils import load_model

    group = mx.distributed.init(strict=True, backend="ring")
    model = load_model(Path(model_path))[0]
    model.model.pipeline(group)
    res = mlxlm_decode(model, steps, prompt_len)
    if group.rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    return 0


def run_mlxlm_ranks(script: str, args: list[str], timeout: float = 900) -> dict:
    """Two ranks of mlx-lm's own pipeline on loopback (MLX's ring backend): `script --mlxlm-rank
    ARGS --out FILE` in two processes; rank 0's JSON from FILE."""
    from k2mlx.distributed.hosts import free_port

    out = tempfile.mktemp(suffix=".json")
    hostfile = tempfile.mktemp(suffix=".json")
    with open(hostfile, "w") as f:
        json.dump([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]], f)
    procs = [subprocess.Popen([sys.executable, script, "--mlxlm-rank", *args, "--out", out],
                              env={**os.environ, "MLX_HOSTFILE": hostfile, "MLX_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for p in procs:
            if p.wait(timeout=timeout) != 0:
                sys.exit(f"mlx-lm pipeline run failed:\n{p.stderr.read()[-3000:]}")
    finally:
        os.unlink(hostfile)
    with open(out) as f:
        return json.load(f)


def mlxlm_pipelined(model_path: str, steps: int, prompt_len: int) -> dict:
    return run_mlxlm_ranks(__file__, ["--model", model_path, "--steps", str(steps), "--prompt-len", str(prompt_len)])


def _median(d):
    d = sorted(d)
    return d[len(d) // 2] if d else 0.0


def stage_times(res: dict) -> dict:
    """Per step of a two-rank run: rank 0 compute/wait/cpu, rank 1 wait/compute/cpu (seconds)."""
    by = {st["rank"]: st["steps"] for st in res["timeline"]}
    r0 = {}
    for s, w, c, *cpu in by.get(0, []):
        e = r0.setdefault(s, {"c0": 0.0, "w0": 0.0, "cpu0": 0.0})
        if c > 0:
            e["c0"], e["cpu0"] = c, (cpu[0] if cpu else 0.0)
        else:
            e["w0"] = w
    for s, w, c, *cpu in by.get(1, []):
        if s in r0:
            r0[s].update(w1=w, c1=c, cpu1=cpu[0] if cpu else 0.0)
    return {s: e for s, e in sorted(r0.items()) if "c1" in e}


def print_timelines(res: dict, key: str, label: str) -> None:
    """Per-step timelines of the 1- and 2-stream runs of `key`, as Markdown tables."""
    for s in (1, 2):
        print(f"\ntimeline, {label}, {s} stream(s) (ms per step):")
        print("| step | rank 0 compute (cpu) | rank 0 wait | rank 1 wait | rank 1 compute (cpu) |")
        print("|---|---|---|---|---|")
        print("\n".join(timeline(res[(key, s)])))


def timeline(res: dict, n: int = 6) -> list[str]:
    """Rank 0 compute (embed + its layers + send), rank 0 wait for logits, rank 1 wait for
    input, rank 1 compute (its layers + head + send back); wall ms, CPU ms in brackets."""
    st = stage_times(res)
    rows = []
    for s in list(st)[:n]:
        e = st[s]
        rows.append(f"| {s} | {e['c0'] * 1e3:.1f} ({e['cpu0'] * 1e3:.1f}) | {e['w0'] * 1e3:.1f} | "
                    f"{e['w1'] * 1e3:.1f} | {e['c1'] * 1e3:.1f} ({e['cpu1'] * 1e3:.1f}) |")
    med = {k: _median([e[k] for e in st.values()]) * 1e3 for k in ("c0", "w0", "w1", "c1", "cpu0", "cpu1")}
    rows.append(f"| median of {len(st)} | {med['c0']:.1f} ({med['cpu0']:.1f}) | {med['w0']:.1f} | "
                f"{med['w1']:.1f} | {med['c1']:.1f} ({med['cpu1']:.1f}) |")
    return rows


def projection(res: dict) -> list[str]:
    """Two hosts from measured parts: per-stage CPU time (what other load on this shared
    machine does not inflate) and the transfer time seen in the single-stream timeline."""
    one = res[("one process", 1)]["cpu_per_forward_s"]
    st = stage_times(res[("two ranks", 1)])
    c0 = _median([e["cpu0"] for e in st.values()])
    c1 = _median([e["cpu1"] for e in st.values()])
    xfer = max(0.0, _median([e["w0"] - e["c1"] for e in st.values()]))
    single = 1.0 / (c0 + c1 + xfer)
    agg2 = 1.0 / max(c0, c1, (c0 + c1 + xfer) / 2)  # two micro-batches keep both stages busy
    return [
        f"one process: {one * 1e3:.1f} ms CPU per token; two ranks: rank 0 {c0 * 1e3:.1f} ms + rank 1 "
        f"{c1 * 1e3:.1f} ms CPU per token (pipeline overhead {(c0 + c1 - one) * 1e3:+.1f} ms), transfer "
        f"{xfer * 1e3:.2f} ms per step",
        f"projected on two hosts: single stream {single:.1f} tok/s vs one process {1 / one:.1f} tok/s "
        f"({single * one:.2f}x); 2 streams {agg2:.1f} tok/s aggregate ({agg2 / single:.2f}x the single stream)",
    ]


def engine_projection(res: dict) -> list[str]:
    """Two hosts, from CPU time of the engine runs: rank 0's whole process (engine, sampling,
    its layers) per token, rank 1's compute per step from its timeline, the transfer from the
    single-stream timeline. A stage can give at most 1 s of CPU per second."""
    one = res[("engine one process", 1)]["rank0_cpu_per_token_s"]
    out = []
    single = None
    for s in (1, 2, 4):
        r = res[("engine two ranks", s)]
        st = stage_times(r)
        r0 = r["rank0_cpu_per_token_s"]
        r1 = _median([e["cpu1"] for e in st.values()]) / max(1, s // r["groups"])  # per token
        if s == 1:
            xfer = max(0.0, _median([e["w0"] - e["c1"] for e in st.values()]))
            single = 1.0 / (r0 + r1 + xfer)
            rate = single
        else:
            rate = 1.0 / max(r0, r1)  # overlapped: the busier stage bounds the rate
        out.append(f"{s} stream(s): rank 0 {r0 * 1e3:.1f} ms CPU per token (whole process), rank 1 "
                   f"{r1 * 1e3:.1f} ms per token -> {rate:.1f} tok/s"
                   + (f", vs one process {1 / one:.1f} tok/s ({one * 1e3:.1f} ms CPU per token): "
                      f"{rate * one:.2f}x" if s == 1 else f", {rate / single:.2f}x the two-rank single stream"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: build a bench tiny K2)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the built checkpoint")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size of the built checkpoint")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per stream")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--split", default=None, help='layer split JSON, e.g. "[[0,4],[4,8]]"')
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    ap.add_argument("--mlxlm-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pin", default=None, metavar="CPU0,CPU1",
                    help="pin the one-process run to CPU0 and rank r to CPU r: equal compute per "
                         "process, as on separate hosts (Linux)")
    a = ap.parse_args()
    if a.mlxlm_rank:
        return mlxlm_rank_main(a.model, a.steps, a.prompt_len, a.out)
    global PIN
    PIN = a.pin
    if a.pin:
        os.sched_setaffinity(0, {int(a.pin.split(",")[0])})
    path = a.model or build_model(os.path.join(tempfile.gettempdir(), f"k2mlx-bench-{a.layers}x{a.hidden}"),
                                  a.layers, a.hidden)
    res = {}
    for s in (1, 2, 4):  # the engine, as the server runs it: overlapped groups over two ranks
        res[("engine one process", s)] = engine_single(path, s, a.steps, a.prompt_len, a.repeats)
        res[("engine two ranks", s)] = pipelined(path, s, a.steps, a.prompt_len, a.split, a.repeats,
                                                 role="engine_bench")
    for s in (1, 2, 4):
        res[("one process", s)] = single(path, s, a.steps, a.prompt_len, a.repeats)
        if s > 1:
            res[("one process batched", s)] = single(path, s, a.steps, a.prompt_len, a.repeats, batched=True)
        res[("two ranks", s)] = pipelined(path, s, a.steps, a.prompt_len, a.split, a.repeats)
    ml1 = mlxlm_single(path, a.steps * a.repeats, a.prompt_len)
    ml2 = mlxlm_pipelined(path, a.steps * a.repeats, a.prompt_len)
    print(f"model: {path}; decode, {a.steps + 1} timed steps per stream, prompt {a.prompt_len} tokens, "
          f"median of {a.repeats} runs" + (f", pinned to cores {a.pin}" if a.pin else ""))
    print("\nthe engine (k2mlx's BatchGenerator engine, what `serve` runs), aggregate decode tok/s, "
          f"median of {a.repeats} runs; two ranks: {res[('engine two ranks', 2)]['groups']} overlapped groups:")
    print("| streams | engine, one process (one batch) | engine, two ranks (overlapped groups) | two ranks / one process |")
    print("|---|---|---|---|")
    for s in (1, 2, 4):
        one, two = res[("engine one process", s)]["tok_s"], res[("engine two ranks", s)]["tok_s"]
        print(f"| {s} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")
    base = res[("engine two ranks", 1)]["tok_s"]
    print(f"engine, two ranks, aggregate vs their own single stream: 2 streams "
          f"{res[('engine two ranks', 2)]['tok_s'] / base:.2f}x, 4 streams "
          f"{res[('engine two ranks', 4)]['tok_s'] / base:.2f}x")
    print_timelines(res, "engine two ranks", "engine, two ranks")
    for key, what in (("tok_s_p10", "tok/s from the 10th-percentile round (least disturbed by other load)"),
                      ("tok_s_median", "tok/s from the median round"), ("tok_s", "tok/s, wall clock")):
        print(f"\n{what}:")
        print("| streams | one process, streams in turn | one process, one batch | two ranks, pipelined | "
              "two ranks / one process (in turn) |")
        print("|---|---|---|---|---|")
        for s in (1, 2, 4):
            one, two = res[("one process", s)][key], res[("two ranks", s)][key]
            b = res.get(("one process batched", s), {}).get(key)
            print(f"| {s} | {one:.1f} | {f'{b:.1f}' if b else '-'} | {two:.1f} | {two / one:.2f}x |")
        base = res[("two ranks", 1)][key]
        print(f"two ranks, aggregate vs their own single stream: 2 streams "
              f"{res[('two ranks', 2)][key] / base:.2f}x, 4 streams {res[('two ranks', 4)][key] / base:.2f}x")
    print("\nsingle stream, same run, k2mlx vs mlx-lm (mlx-lm: its own DeepseekV3 pipeline, every rank "
          "runs the loop, all_gather of the last hidden state):")
    print("| | one process tok/s (median round) | two ranks tok/s (median round) | two / one | "
          "CPU ms per token, one process |")
    print("|---|---|---|---|---|")
    k1, k2 = res[("one process", 1)], res[("two ranks", 1)]
    print(f"| k2mlx | {k1['tok_s_median']:.1f} | {k2['tok_s_median']:.1f} | "
          f"{k2['tok_s_median'] / k1['tok_s_median']:.2f}x | {k1['cpu_per_forward_s'] * 1e3:.1f} |")
    print(f"| mlx-lm | {ml1['tok_s_median']:.1f} | {ml2['tok_s_median']:.1f} | "
          f"{ml2['tok_s_median'] / ml1['tok_s_median']:.2f}x | {ml1['cpu_per_token_s'] * 1e3:.1f} |")
    print_timelines(res, "two ranks", "two ranks")
    print("\nfrom CPU time (two hosts, one core each, no other load), raw submit loop:")
    print("\n".join(projection(res)))
    print("\nfrom CPU time, the engine (two hosts, one core each, no other load):")
    print("\n".join(engine_projection(res)))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # a fast exit without interpreter teardown
