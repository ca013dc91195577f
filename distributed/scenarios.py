"""Rank-0 roles that need no engine: used by the tests and the pipeline benchmark.

A role is called on rank 0 as `fn(pipe, tokenizer, spec=..., health=..., **role_args)`.
"""
from __future__ import annotations

import json
import time

import mlx.core as mx
import numpy as np


class _Done:
    def __init__(self, logits):
        self.logits = logits

    def result(self):
        return self.logits


def submit_step(pipe, tokens, cache):
    """pipe.submit where the model has it (pipeline, LocalSteps); else one blocking step (a
    tensor-parallel model has nothing to overlap)."""
    if hasattr(pipe, "submit"):
        return pipe.submit(tokens, cache)
    return _Done(pipe(tokens, cache))


class LocalSteps:
    """A single-process model with the pipeline's two-phase API (the reference in tests)."""

    def __init__(self, model):
        self.model = model
        self.full_logits = True
        self.cpu: list[float] = []  # process CPU seconds per forward

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, tokens, cache=None):
        return self.model(tokens, cache)

    def submit(self, tokens, cache=None):
        c0 = time.process_time()
        out = self.model(tokens, cache)
        mx.eval(out)
        self.cpu.append(time.process_time() - c0)
        return _Done(out)


def batched_cache_ops(pipe, tokenizer, *, prompts: list[list[int]], out: str, full_logits: bool = True,
                      **_) -> int:
    """What a continuous-batching engine does to caches, end to end: prefill sequences alone,
    merge them into one left-padded batch, decode, drop a finished row (filter), add a new
    sequence (extend), rewind (trim), keep a prefix copy (deepcopy). Saves all logits."""
    import copy

    res: dict[str, np.ndarray] = {}
    pipe.full_logits = full_logits

    def step(name, tokens, cache):
        lg = pipe(mx.array(tokens, dtype=mx.int32), cache).astype(mx.float32)  # [B, L, vocab]
        res[name] = np.array(lg)
        return [int(t) for t in mx.argmax(lg[:, -1], axis=-1).tolist()]

    singles = [pipe.make_cache() for _ in prompts[:2]]
    nxt = [step(f"prefill{i}", [p], c)[0] for i, (p, c) in enumerate(zip(prompts[:2], singles))]
    batch = [singles[0][i].merge([c[i] for c in singles]) for i in range(len(singles[0]))]
    del singles
    for s in range(3):
        nxt = step(f"batch{s}", [[t] for t in nxt], batch)
    for c in batch:
        c.filter([1])                                    # row 0 finished
    nxt = nxt[1:]
    nxt = step("filtered", [[t] for t in nxt], batch)
    third = pipe.make_cache()
    n3 = step("prefill2", [prompts[2]], third)[0]
    third_b = [c.merge([c]) for c in third]
    for c, o in zip(batch, third_b):
        c.extend(o)                                      # a new sequence joins the batch
    del third, third_b
    nxt = step("extended", [[nxt[0]], [n3]], batch)
    keep = copy.deepcopy(batch)                          # prefix cache copy
    nxt = step("after_copy", [[t] for t in nxt], batch)
    for c in batch:
        c.trim(1)                                        # rewind one token
    step("trimmed", [[t] for t in nxt], batch)
    step("from_copy", [[t] for t in nxt], keep)
    np.savez(out, **res)
    return 0


def greedy_logits(pipe, tokenizer, *, prompts: list[list[int]], steps: int, out: str,
                  micro_batches: bool = False, hold_s: float = 0.0, full_logits: bool = True,
                  **_) -> int:
    """Prefill each prompt, then `steps` greedy decode steps; save every float32 logit.

    With `micro_batches` the prompts run as separate sequences with overlapping steps
    (submit A, submit B, collect A, ...), the schedule an engine uses for pipelining.
    `hold_s` sleeps between decode steps (the fault tests kill a rank meanwhile).
    """
    pipe.full_logits = full_logits  # every prefill position, to compare them all
    caches = [pipe.make_cache() for _ in prompts]
    seqs = [mx.array([p], dtype=mx.int32) for p in prompts]  # each [1, L]
    results: dict[str, np.ndarray] = {}
    pend = [submit_step(pipe, t, c) for t, c in zip(seqs, caches)]
    tokens = []
    for i, p in enumerate(pend):
        logits = p.result().astype(mx.float32)           # [1, L, vocab]
        results[f"prefill_{i}"] = np.array(logits)
        tokens.append([int(mx.argmax(logits[0, -1]).item())])
    for s in range(steps):
        if hold_s:  # slow, observable decode for the fault tests
            print(f"decode step {s}", flush=True)
            time.sleep(hold_s)
        if micro_batches:
            pend = [submit_step(pipe, mx.array([[t[-1]]], dtype=mx.int32), c) for t, c in zip(tokens, caches)]
            outs = [p.result() for p in pend]
        else:
            outs = [pipe(mx.array([[t[-1]]], dtype=mx.int32), c) for t, c in zip(tokens, caches)]
        for i, lg in enumerate(outs):
            lg = lg.astype(mx.float32)                   # [1, 1, vocab]
            results[f"decode_{i}_{s}"] = np.array(lg)
            tokens[i].append(int(mx.argmax(lg[0, -1]).item()))
    np.savez(out, **results)
    with open(out + ".json", "w") as f:
        json.dump({"tokens": tokens}, f)
    print("tokens", json.dumps(tokens), flush=True)
    return 0


def decode_bench(pipe, tokenizer, *, streams: int, prompt_len: int, steps: int, out: str,
                 warmup: int = 2, repeats: int = 1, batched: bool = False, **_) -> int:
    """Decode tok/s with `streams` concurrent sequences: one micro-batch per stream, submitted
    back to back (pipelined over ranks), or with `batched` one batch of all streams.
    Reports the median of `repeats` timed runs and tok/s from the median round (one token per
    stream), which a busy shared machine disturbs far less; the timeline is the last run's."""
    prompt = mx.array([[(7 * i + 3) % 50 + 1 for i in range(prompt_len)]], dtype=mx.int32)
    caches = [pipe.make_cache() for _ in range(streams)]
    last = [int(mx.argmax(pipe(prompt, c)[0, -1]).item()) for c in caches]
    if batched:
        caches = [[caches[0][i].merge([c[i] for c in caches]) for i in range(len(caches[0]))]]
        groups = [list(range(streams))]
    else:
        groups = [[i] for i in range(streams)]

    def submit(g: int):
        toks = mx.array([[last[i]] for i in groups[g]], dtype=mx.int32)  # [B, 1]
        return submit_step(pipe, toks, caches[g])

    rounds: list[float] = []  # seconds per round (every stream one token), steady state

    def run(n: int) -> float:
        t0 = time.perf_counter()
        pend = [submit(g) for g in range(len(groups))]
        for _ in range(n):
            t = time.perf_counter()
            for g in range(len(groups)):
                lg = pend[g].result()                    # [B, 1, vocab]
                for row, i in enumerate(groups[g]):
                    last[i] = int(mx.argmax(lg[row, -1]).item())
                pend[g] = submit(g)
            rounds.append(time.perf_counter() - t)
        for p in pend:
            p.result()
        return time.perf_counter() - t0

    run(warmup)
    rounds.clear()
    if hasattr(pipe, "cpu"):
        pipe.cpu.clear()
    dts = []
    for _ in range(max(1, repeats)):
        first_step = getattr(pipe, "_step", 0)
        dts.append(run(steps))
    dt = sorted(dts)[len(dts) // 2]
    stats = pipe.stats() if hasattr(pipe, "stats") else []
    for st in stats:  # keep the last timed run only
        st["steps"] = [x for x in st["steps"] if x[0] > first_step]
    srt = sorted(rounds)
    med, p10 = srt[len(srt) // 2], srt[len(srt) // 10]
    with open(out, "w") as f:
        json.dump({"streams": streams, "batched": batched, "steps": steps + 1, "seconds": dt,
                   "all_seconds": dts, "tok_s": streams * (steps + 1) / dt,
                   "median_round_s": med, "tok_s_median": streams / med,
                   "p10_round_s": p10, "tok_s_p10": streams / p10, "timeline": stats,
                   "cpu_per_forward_s": sorted(getattr(pipe, "cpu", []) or [0])[len(getattr(pipe, "cpu", []) or [0]) // 2]}, f)
    return 0


def engine_texts(pipe, tokenizer, *, prompts: list[list[int]], max_tokens: int, out: str,
                 ban: list[int] = (), overlap: bool | None = None, health=None, **_) -> int:
    """The engine on top of the pipeline: every prompt as a concurrent greedy request (token ids,
    `ban` biased away so lengths are fixed); saves the texts and the ranks' step records.
    Prints each request's end (the fault tests read them) and stream 0's progress."""
    from k2mlx.engine.engine import Engine
    from k2mlx.engine.events import Done, TextDelta
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    eng = Engine(pipe, tokenizer, max_batch=8, cache_bytes=0, overlap=overlap)
    if health is not None:  # as `serve` does: a failed rank ends the requests with its error
        health.on_failure(lambda err: (eng.fail(err), time.sleep(1.0)))
    texts, errors = [], []
    try:
        reqs = [GenerationRequest(prompt_tokens=p, max_tokens=max_tokens, parse=False,
                                  sampling=SamplingParams(temperature=0.0, logit_bias={t: -100.0 for t in ban}))
                for p in prompts]
        streams = [eng.generate(r) for r in reqs]
        for i, st in enumerate(streams):
            parts = []
            for ev in st:
                if isinstance(ev, TextDelta):
                    parts.append(ev.text)
                    if i == 0 and len(parts) % 10 == 0:
                        print(f"decode step {len(parts)}", flush=True)
                elif isinstance(ev, Done):
                    errors.append(ev.error)
                    line = f"done {i} {ev.finish_reason} {ev.error}"
                    print(line, flush=True)
                    with open(out + ".ends", "a") as f:  # survives the launcher stopping us
                        f.write(f"{time.time():.3f} {line}\n")
            texts.append("".join(parts))
    finally:
        eng.close()
    stats = pipe.stats() if hasattr(pipe, "stats") and eng.failure is None else []
    with open(out, "w") as f:
        json.dump({"texts": texts, "errors": errors, "groups": eng.n_groups, "timeline": stats}, f)
    return 0


def engine_bench(pipe, tokenizer, *, streams: int, prompt_len: int, steps: int, out: str,
                 repeats: int = 1, overlap: bool | None = None, **_) -> int:
    """Decode throughput through the engine (what the server runs): `streams` concurrent greedy
    requests of `steps` tokens. Aggregate tok/s of one run = decoded tokens / the span from the
    first request's first token to the last one's end (from each request's own timings); the
    median of `repeats` runs after one warm-up. The timeline is the last run's. Compiled kernels
    stay on, as in `serve` (k2mlx/engine/threads.py)."""
    from k2mlx.engine.engine import Engine
    from k2mlx.engine.events import Done
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    ban = {t: -100.0 for t in getattr(tokenizer, "eos_token_ids", [])}
    eng = Engine(pipe, tokenizer, max_batch=max(2, streams), cache_bytes=0, overlap=overlap)
    rates, first_step = [], 0
    try:
        for run in range(repeats + 1):
            first_step = getattr(pipe, "_step", 0)
            reqs = [GenerationRequest(prompt_tokens=[(7 * i + 3 + s) % 50 + 1 for i in range(prompt_len)],
                                      max_tokens=steps + 1, parse=False,
                                      sampling=SamplingParams(temperature=0.0, logit_bias=ban))
                    for s in range(streams)]
            t0, c0 = time.perf_counter(), time.process_time()
            subs = [eng.generate(r) for r in reqs]
            dones = [[e for e in st if isinstance(e, Done)][-1] for st in subs]
            t1, c1 = time.perf_counter(), time.process_time()
            assert all(d.error is None for d in dones), [d.error for d in dones]
            # requests start together: the longest decode span covers every decoded token
            span = max(d.timings.decode_s for d in dones)
            toks = sum(d.timings.generated_tokens - 1 for d in dones)
            if run:  # run 0 warms up
                # rank 0's whole process CPU (engine, sampling, its layers, sends) per token
                rates.append({"tok_s": toks / span, "wall_s": t1 - t0,
                              "cpu_per_token_s": (c1 - c0) / sum(d.timings.generated_tokens for d in dones)})
    finally:
        eng.close()
    stats = pipe.stats() if hasattr(pipe, "stats") else []
    for st in stats:  # keep the last timed run only
        st["steps"] = [x for x in st["steps"] if x[0] > first_step]
    med = sorted(rates, key=lambda r: r["tok_s"])[len(rates) // 2]
    with open(out, "w") as f:
        json.dump({"streams": streams, "groups": eng.n_groups, "tok_s": med["tok_s"],
                   "rank0_cpu_per_token_s": med["cpu_per_token_s"],
                   "all_tok_s": [r["tok_s"] for r in rates], "timeline": stats}, f)
    return 0


def engine_session(pipe, tokenizer, *, out: str, **_) -> int:
    """What a server's engine lives through, on any model (local, pipeline, tensor): seeded
    sampling of concurrent requests (continuous batching), a request cancelled mid-generation,
    late joiners, and a repeated prompt served from the prefix cache. Saves the texts and the
    last request's cached-token count."""
    from k2mlx.engine.engine import Engine
    from k2mlx.engine.events import Done, TextDelta
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    bias = {t: -100.0 for t in tokenizer.eos_token_ids}
    prompts = ["hello world", "the quick brown fox", "a test", "this is a test of the tokenizer"]

    def req(p, seed):
        return GenerationRequest(prompt=p, max_tokens=16,
                                 sampling=SamplingParams(temperature=0.9, seed=seed, logit_bias=bias))

    def text(stream):
        evs = list(stream)
        if not isinstance(evs[-1], Done) or evs[-1].error is not None:
            raise RuntimeError(f"request failed: {evs[-1]}")
        return "".join(e.text for e in evs if isinstance(e, TextDelta)), evs[-1]

    eng = Engine(pipe, tokenizer, max_batch=8, overlap=False)
    try:
        first = [eng.generate(req(p, 10 + i)) for i, p in enumerate(prompts[:3])]
        victim = eng.generate(req("to be cancelled", 99))
        next(iter(victim))
        victim.close()
        texts = [text(s)[0] for s in first]
        late = [eng.generate(req(p, 20 + i)) for i, p in enumerate(prompts)]
        texts += [text(s)[0] for s in late]
        again, done = text(eng.generate(req(prompts[0], 10)))
        texts.append(again)
    finally:
        eng.close()
    with open(out, "w") as f:
        json.dump({"texts": texts, "cached_tokens": done.usage.cached_tokens}, f)
    return 0


def memory_report(pipe, tokenizer, *, out: str, health=None, **_) -> int:
    """Every rank's peak RSS right after load, before any forward (the workers' answer to a
    stats request proves they are past their load; their next heartbeats carry their memory)."""
    from .health import memory_info

    pipe.stats()
    time.sleep(2.5 * health.spec.interval_s)
    ranks = [memory_info()] + [health.status.get(r, {}).get("mem", {}) for r in range(1, health.spec.size)]
    with open(out, "w") as f:
        json.dump({"peak_rss": [m.get("peak_rss") for m in ranks]}, f)
    return 0


def prefill_logprobs(pipe, tokenizer, *, out: str, chunk: int, prompts: list[list[int]], shared: list[int],
                     **_) -> int:
    """Pipelined prefill through the engine (k2mlx/engine/prefill.py), with every case issue 14
    asks for, each request's top-5 logprobs of its first 4 greedy tokens saved (the first ones
    depend on the whole prefill): prompts of 1, 2 and 7 chunks alone; a prefix-cache hit in the
    middle of a prompt (`shared` + a tail, after `shared` + another tail); a long prompt joining
    while another sequence decodes; a request cancelled mid-prefill, then one more request."""
    from k2mlx.engine.engine import Engine
    from k2mlx.engine.events import Done, PrefillProgress, TextDelta
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    ban = {t: -100.0 for t in tokenizer.eos_token_ids}

    def req(p, n=4, progress=False):
        return GenerationRequest(prompt_tokens=p, max_tokens=n, parse=False, logprobs=True, top_logprobs=5,
                                 progress=progress, sampling=SamplingParams(temperature=0.0, logit_bias=ban))

    def lps(stream):
        evs = list(stream)
        if not isinstance(evs[-1], Done) or evs[-1].error is not None:
            raise RuntimeError(f"request failed: {evs[-1]}")
        rows = [lp for e in evs if isinstance(e, TextDelta) and e.logprobs for lp in e.logprobs]
        return [[lp, [v for _, v in tops]] for _, lp, tops in rows], evs[-1].usage.cached_tokens

    res: dict = {}
    eng = Engine(pipe, tokenizer, max_batch=8, cache_bytes=1 << 28, prefill_step_size=chunk, overlap=False)
    try:
        for i, p in enumerate(prompts):
            res[f"alone{i}"] = lps(eng.generate(req(p)))[0]
        lps(eng.generate(req(shared + [5, 6, 7, 8] * 3)))
        res["hit"], res["hit_cached"] = lps(eng.generate(req(shared + [9, 10, 11] * 5)))
        runner = eng.generate(req([3, 1, 4, 1, 5], n=40))
        first = next(iter(runner))  # decoding when the long prompt joins
        joiner = eng.generate(req(prompts[-1][::-1]))
        res["joined"] = lps(joiner)[0]
        res["runner"] = lps(runner)[0]
        del first
        victim = eng.generate(req(prompts[-1][1:], progress=True))
        ev = next(iter(victim))
        assert isinstance(ev, PrefillProgress) and ev.done < ev.total, ev
        victim.close()  # mid-prefill
        res["after_cancel"] = lps(eng.generate(req(prompts[1])))[0]
    finally:
        eng.close()
    res["max_inflight"] = max((st.get("max_inflight", 0) for st in (pipe.stats() if hasattr(pipe, "stats") else [])),
                              default=0)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


class _OneAtATime:
    """A pipeline without its two-phase API: the engine then waits for every prompt chunk's
    logits before sending the next (how prefill ran before it was pipelined; the benchmark's
    baseline)."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        if name == "submit":
            raise AttributeError(name)
        return getattr(self._pipe, name)

    def __call__(self, tokens, cache=None):
        return self._pipe(tokens, cache)

    def make_cache(self):
        return self._pipe.make_cache()


def prefill_bench(pipe, tokenizer, *, lengths: list[int], chunk: int | None, out: str, blocking: bool = False,
                  repeats: int = 2, **_) -> int:
    """Time to first token through the engine (one request, 1 token out, no prefix cache) for
    prompts of each length: the best of `repeats` after a warm-up. `blocking`: prompt chunks wait
    for their logits (`_OneAtATime`). Saves prefill tok/s, wall and CPU seconds, and the ranks'
    step records of the last run for the two-host projection."""
    from k2mlx.engine.engine import Engine
    from k2mlx.engine.events import Done
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    model = _OneAtATime(pipe) if blocking and hasattr(pipe, "submit") else pipe
    eng = Engine(model, tokenizer, max_batch=1, cache_bytes=0, prefill_step_size=chunk)
    res = {"chunk": eng.prefill_step_size, "runs": {}}
    try:
        for n in lengths:
            best = None
            for r in range(repeats + 1):
                first_step = getattr(pipe, "_step", 0)
                toks = [(7 * i + 3 + r) % 300 + 5 for i in range(n)]
                c0 = time.process_time()
                done = [e for e in eng.generate(GenerationRequest(prompt_tokens=toks, max_tokens=1, parse=False,
                                                                  sampling=SamplingParams(temperature=0.0)))
                        if isinstance(e, Done)][-1]
                cpu = time.process_time() - c0
                assert done.error is None, done.error
                row = {"prefill_s": done.timings.prefill_s, "tok_s": n / done.timings.prefill_s, "cpu_s": cpu}
                if r and (best is None or row["prefill_s"] < best["prefill_s"]):
                    stats = pipe.stats() if hasattr(pipe, "stats") else []
                    for st in stats:
                        st["steps"] = [x for x in st["steps"] if x[0] > first_step]
                    best = {**row, "timeline": stats}
            res["runs"][str(n)] = best
    finally:
        eng.close()
    with open(out, "w") as f:
        json.dump(res, f)
    return 0
