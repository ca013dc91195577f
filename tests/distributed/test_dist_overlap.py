"""The engine over two ranks overlaps micro-batches: with two or more requests in flight the
engine keeps one group's step on rank 1 while rank 0 computes the other group's, and the texts
are exactly those of the single-process engine. Real rank processes on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_dist_faults import LIMIT_S, assert_all_gone, kill_groups
from test_dist_pipeline import PROMPTS, launch

PROMPTS4 = PROMPTS + [[9, 8, 7, 6]]


@pytest.fixture(scope="module")
def single_engine(tiny_checkpoint, tiny_tokenizer):
    """The reference: the same scenario on the whole model in this process, no pipeline."""
    from k2mlx import load
    from k2mlx.distributed.scenarios import engine_texts

    model, _ = load(str(tiny_checkpoint))

    def run(prompts, max_tokens, out):
        engine_texts(model, tiny_tokenizer, prompts=prompts, max_tokens=max_tokens, out=str(out),
                     ban=list(tiny_tokenizer.eos_token_ids))
        return json.loads(out.read_text())

    return run


def overlapped_steps(res) -> int:
    """Steps rank 1 received while rank 0 still waited for an earlier step's logits (from the
    step records the ranks keep: rank 0 stamps each step with the last step it collected)."""
    seen = {st["rank"]: st.get("seen", []) for st in res["timeline"]}[1]
    return sum(1 for step, collected in seen if collected < step - 1)


@pytest.mark.parametrize("n", [2, 4])
def test_pipelined_engine_matches_single_process(tiny_checkpoint, tiny_tokenizer, single_engine, tmp_path, n):
    args = {"prompts": PROMPTS4[:n], "max_tokens": 12, "ban": list(tiny_tokenizer.eos_token_ids)}
    ref = single_engine(PROMPTS4[:n], 12, tmp_path / "ref.json")
    assert ref["groups"] == 1
    launch(tiny_checkpoint, "engine_texts", {**args, "out": str(tmp_path / "pp.json")}, [[0, 2], [2, 4]])
    got = json.loads((tmp_path / "pp.json").read_text())
    assert got["groups"] == 2 and got["errors"] == [None] * n
    assert got["texts"] == ref["texts"] and all(len(t) > 0 for t in got["texts"])
    # overlap really happened: most decode steps of one group went out before the other
    # group's logits were back; rank 0 had two steps in flight
    assert got["timeline"][0]["max_inflight"] >= 2
    assert overlapped_steps(got) >= 10, got["timeline"][1]["seen"]


def test_single_stream_is_not_overlapped(tiny_checkpoint, tiny_tokenizer, single_engine, tmp_path):
    """One request: its decode steps go one at a time (the counters do tell the two apart). Only
    its prompt chunk, whose logits nobody reads, is still in flight when the first decode step is
    sent (pipelined prefill, k2mlx/engine/prefill.py)."""
    args = {"prompts": PROMPTS[:1], "max_tokens": 12, "ban": list(tiny_tokenizer.eos_token_ids)}
    ref = single_engine(PROMPTS[:1], 12, tmp_path / "ref.json")
    launch(tiny_checkpoint, "engine_texts", {**args, "out": str(tmp_path / "pp.json")}, [[0, 1], [1, 4]])
    got = json.loads((tmp_path / "pp.json").read_text())
    assert got["texts"] == ref["texts"]
    assert got["timeline"][0]["max_inflight"] == 2 and overlapped_steps(got) == 1


def test_sigkill_rank1_ends_every_overlapped_request_with_an_error(tiny_checkpoint, tiny_tokenizer, tmp_path):
    state = tmp_path / "state.json"
    args = {"prompts": PROMPTS4, "max_tokens": 4000, "ban": list(tiny_tokenizer.eos_token_ids),
            "out": str(tmp_path / "o.json")}
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1",
           "--model", str(tiny_checkpoint), "--role", "k2mlx.distributed.scenarios:engine_texts",
           "--role-args", json.dumps(args), "--layers", "[[0, 2], [2, 4]]", "--deadline", "3.0",
           "--state", str(state)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err, decoding = [], [], threading.Event()

    def read(stream, sink):
        for line in stream:
            sink.append((time.monotonic(), line))
            if line.startswith("decode step 20"):
                decoding.set()

    threading.Thread(target=read, args=(proc.stdout, out), daemon=True).start()
    threading.Thread(target=read, args=(proc.stderr, err), daemon=True).start()
    pids = []
    try:
        assert decoding.wait(90), "generation never started:\n" + "".join(x for _, x in out + err)
        pids = [r["pid"] for r in json.loads(state.read_text())["ranks"]]
        t_kill, t_wall = time.monotonic(), time.time()
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=LIMIT_S + 5)
        time.sleep(0.2)  # the reader threads catch up
        text = "".join(x for _, x in out + err)
        ends_file = tmp_path / "o.json.ends"
        ends = [ln.split(" ", 1) for ln in (ends_file.read_text().splitlines() if ends_file.exists() else [])]
        assert len(ends) == 4, text
        assert all(" error ClusterError" in x and "rank 1" in x for _, x in ends), ends
        assert max(float(t) for t, _ in ends) - t_wall < LIMIT_S
        assert rc == 3 and time.monotonic() - t_kill < LIMIT_S + 1, text
        assert_all_gone(pids, within=1.0)
    finally:
        kill_groups([proc.pid] + pids)


def test_groups_join_cancel_seed_and_prefix_cache_in_process(tiny_checkpoint):
    """The group scheduling itself, in one process: `LocalSteps` has the pipeline's two-phase
    API, so the engine runs two groups (each on its own thread) over the whole model. Seeded
    sampling, a cancelled request, late joiners and prefix-cache reuse give what the plain engine
    gives, and every slot is free at the end."""
    from k2mlx import load
    from k2mlx.distributed.scenarios import LocalSteps
    from k2mlx.engine import Engine
    from k2mlx.engine.events import Done, TextDelta
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    model, tok = load(str(tiny_checkpoint))
    bias = {t: -100.0 for t in tok.eos_token_ids}
    prompts = ["hello world", "the quick brown fox", "a test", "this is a test of the tokenizer"]

    def req(p, seed):
        return GenerationRequest(prompt=p, max_tokens=16, sampling=SamplingParams(temperature=0.9, seed=seed,
                                                                                 logit_bias=bias))

    def text(stream):
        evs = list(stream)
        assert isinstance(evs[-1], Done) and evs[-1].error is None, evs[-1]
        return "".join(e.text for e in evs if isinstance(e, TextDelta)), evs[-1]

    def session(eng):
        first = [eng.generate(req(p, 10 + i)) for i, p in enumerate(prompts[:3])]
        victim = eng.generate(req("to be cancelled", 99))
        next(iter(victim))
        victim.close()                                   # cancelled mid-generation
        out = [text(s)[0] for s in first]
        late = [eng.generate(req(p, 20 + i)) for i, p in enumerate(prompts)]  # join after the others
        out += [text(s)[0] for s in late]
        again, done = text(eng.generate(req(prompts[0], 10)))  # same prompt again: prefix cache hit
        out.append(again)
        t0 = time.monotonic()
        while eng.stats.active and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        assert eng.stats.active == 0
        return out, done.usage

    plain = Engine(model, tok, max_batch=8)
    try:
        ref, ref_usage = session(plain)
    finally:
        plain.close()
    eng = Engine(LocalSteps(model), tok, max_batch=8)
    try:
        assert eng.n_groups == 2
        got, usage = session(eng)
    finally:
        eng.close()
    assert got == ref and got[-1] == got[0]
    assert usage == ref_usage and usage.cached_tokens > 0
