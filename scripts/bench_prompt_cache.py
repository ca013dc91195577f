"""The persistent prompt cache (k2mlx/engine/disk_cache.py): what it saves and what it costs.

    python scripts/bench_prompt_cache.py [--preset small] [--system-tokens 4000] [--turns 10]

(b) time to first token for a long system prompt: cold, then after a "restart" (a fresh engine
    with an empty memory cache, the same disk folder), plus write/read cost per token;
(c) a 10-turn agent trace with growing tool results: prefill tokens computed with no cache, with
    the in-memory cache, and with the disk cache alone across a restart at every turn; and the
    same trace on a thinking checkpoint, whose template drops earlier reasoning.

Everything runs on a random K2-shaped checkpoint built here (k2mlx.tiny); wall-clock times are
this machine's. Token counts do not depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} tool for the agent",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
    for name in ("read_file", "list_dir", "grep", "run_shell")]


VOCAB = ("the file test function error value return import class module path line run check build "
         "cache model token layer request reply server agent tool call result list read write fix").split()


def words(tok, n: int, seed: int) -> str:
    """Text of at least n tokens (random words, so nothing repeats across calls)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, have = [], 0
    while have < n:
        chunk = " ".join(rng.choice(VOCAB, size=64)) + "\n"
        parts.append(chunk)
        have += len(tok.encode(chunk, allow_special=False))
    return "".join(parts)


def ask(engine, messages, tools=None, max_tokens=4):
    from k2mlx.engine.events import Done
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    t0 = time.perf_counter()
    first = None
    done = None
    for ev in engine.generate(GenerationRequest(messages=messages, tools=tools, max_tokens=max_tokens,
                                                sampling=SamplingParams(temperature=0.0))):
        if first is None:
            first = time.perf_counter() - t0
        if isinstance(ev, Done):
            done = ev
    return first if first is not None else time.perf_counter() - t0, done


def ttft(model, tok, path, n_system: int, block: int, folder: str) -> None:
    from k2mlx.engine import Engine
    from k2mlx.engine.disk_cache import open_prompt_cache

    system = words(tok, n_system, 0)
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]  # noqa: E731
    cold_eng = Engine(model, tok, max_batch=1, cache_bytes=0)
    t_cold, d_cold = ask(cold_eng, msgs("What is in the first file?"))
    cold_eng.close()
    disk = open_prompt_cache(model, path, folder, max_gb=8, block=block)
    eng = Engine(model, tok, max_batch=1, cache_bytes=0, prompt_cache=disk)
    t_write, _ = ask(eng, msgs("What is in the first file?"))
    t0 = time.perf_counter()
    eng.close()  # waits for the writer
    flush = time.perf_counter() - t0
    wrote = disk.written_bytes
    disk2 = open_prompt_cache(model, path, folder, max_gb=8, block=block)  # the restarted server
    eng2 = Engine(model, tok, max_batch=1, cache_bytes=0, prompt_cache=disk2)
    t_warm, d_warm = ask(eng2, msgs("And the second one?"))
    eng2.close()
    n = d_cold.usage.prompt_tokens
    print(f"(b) system prompt {n} tokens, block {block}")
    print(f"    cold TTFT {t_cold:.2f} s; first run with the disk cache {t_write:.2f} s "
          f"(+{flush:.2f} s of writes finishing after the reply)")
    print(f"    after restart: TTFT {t_warm:.2f} s = {t_warm / t_cold:.3f}x cold; cached {d_warm.usage.cached_tokens} "
          f"of {d_warm.usage.prompt_tokens} tokens")
    per_tok = wrote / max(1, disk.written_blocks * block)
    print(f"    written {wrote / 1e6:.1f} MB in {disk.written_blocks} blocks = {per_tok:.0f} B/token; "
          f"write {wrote / max(disk.write_seconds, 1e-9) / 1e6:.0f} MB/s, read "
          f"{disk2.read_bytes / max(disk2.read_seconds, 1e-9) / 1e6:.0f} MB/s (page cache warm)")


def agent_trace(tok, system: str, turns: int, thinking: bool):
    """A growing conversation: each turn the assistant calls a tool and gets a longer result."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Fix the failing test in this repo."}]
    out = []
    for i in range(turns):
        out.append([dict(m) for m in msgs])
        call = {"role": "assistant", "content": "", "tool_calls": [{
            "id": f"functions.read_file:{i}", "type": "function",
            "function": {"name": "read_file", "arguments": f'{{"path": "src/file{i}.py"}}'}}]}
        if thinking:
            call["reasoning_content"] = words(tok, 60, 100 + i)
        msgs.append(call)
        msgs.append({"role": "tool", "tool_call_id": f"functions.read_file:{i}",
                     "content": words(tok, 150 + 60 * i, 200 + i)})
        if i % 3 == 2:  # now and then the user says something: a new "turn" for the thinking template
            ans = {"role": "assistant", "content": "I changed the function; running the tests again."}
            if thinking:
                ans["reasoning_content"] = words(tok, 40, 300 + i)
            msgs += [ans, {"role": "user", "content": f"Still failing, see step {i}."}]
    return out


def trace_counts(model, tok, path, prompts, block: int, folder: str) -> dict:
    from k2mlx.engine import Engine
    from k2mlx.engine.disk_cache import open_prompt_cache

    res = {}
    for mode in ("none", "memory", "disk"):
        computed = total = 0
        eng = None if mode == "disk" else Engine(model, tok, max_batch=1, cache_bytes=(1 << 30) if mode == "memory" else 0)
        sub = tempfile.mkdtemp(dir=folder)
        for msgs in prompts:
            if mode == "disk":  # a restart before every turn: only the disk carries over
                eng = Engine(model, tok, max_batch=1, cache_bytes=0,
                             prompt_cache=open_prompt_cache(model, path, sub, max_gb=8, block=block))
            _, done = ask(eng, msgs, tools=TOOLS, max_tokens=2)
            computed += done.usage.prompt_tokens - done.usage.cached_tokens
            total += done.usage.prompt_tokens
            if mode == "disk":
                eng.close()
        if mode != "disk":
            eng.close()
        res[mode] = (computed, total)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["nano", "small"])
    ap.add_argument("--system-tokens", type=int, default=4000)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--skip-ttft", action="store_true")
    args = ap.parse_args()

    from k2mlx import load
    from k2mlx.tiny import make_tiny_checkpoint

    work = tempfile.mkdtemp(prefix="k2mlx-bench-pc-")
    try:
        for thinking in (False, True):
            path = make_tiny_checkpoint(os.path.join(work, f"ck{int(thinking)}"), preset=args.preset,
                                        dtype="bfloat16", seed=0, thinking=thinking)
            model, tok = load(path)
            if not thinking and not args.skip_ttft:
                ttft(model, tok, path, args.system_tokens, args.block, os.path.join(work, "pc-ttft"))
            prompts = agent_trace(tok, words(tok, 1500, 1), args.turns, thinking)
            res = trace_counts(model, tok, path, prompts, args.block, work)
            kind = "thinking" if thinking else "instruct"
            print(f"(c) {args.turns}-turn agent trace, {kind} template: prefill tokens computed / prompt tokens")
            for mode, (computed, total) in res.items():
                print(f"    cache {mode:6s}: {computed:6d} / {total:6d} ({1 - computed / total:.1%} reused)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
