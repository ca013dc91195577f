"""Constrained vs free decoding, side by side in one process: decode tok/s through the engine on
the default model (k2-nano) and on the tiny "small" preset, plus the mask time per token; and
the mask time per token of the same grammars at K2's vocabulary size (163,840 ids), on a
synthetic vocabulary (see --k2-vocab).

    python scripts/bench_grammar.py [--tokens 128] [--rounds 3] [--k2-vocab]

Each round runs every mode once, interleaved, so drift on a shared machine hits all alike; the
best round of each mode is reported (on a shared CPU the best is the least disturbed). Compare
json_schema with free (same prompt) and auto_tools with free_tools (same prompt, tools declared)."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]


def modes(n: int, eos: set[int]) -> dict:
    """name -> request kwargs. Every mode decodes exactly n tokens: stops are banned in the free
    ones; the array has n//2 items (digit + comma per item) so the constrained one runs n too."""
    from k2mlx.engine.request import SamplingParams

    ban = {t: -100.0 for t in eos}
    schema = dict(ARRAY, minItems=n // 2, maxItems=n // 2)
    return {
        "free": dict(sampling=SamplingParams(temperature=0.0, logit_bias=ban)),
        "json_schema": dict(sampling=SamplingParams(temperature=0.0),
                            response_format={"type": "json_schema", "json_schema": {"schema": schema}}),
        "free_tools": dict(sampling=SamplingParams(temperature=0.0, logit_bias=ban), tools=TOOLS, _auto=False),
        "auto_tools": dict(sampling=SamplingParams(temperature=0.0, logit_bias=ban), tools=TOOLS, _auto=True),
    }


def run_engine(label: str, path, n: int, rounds: int) -> list[dict]:
    from k2mlx import load
    from k2mlx.engine import Engine
    from k2mlx.engine.request import GenerationRequest
    from k2mlx.events import Done
    from k2mlx.grammar import plan

    model, tok = load(path)
    eng = Engine(model, tok, max_batch=1, cache_bytes=0)
    msgs = [{"role": "user", "content": "Count for me, please."}]
    results: dict[str, list] = {}
    try:
        for r in range(rounds + 1):  # round 0 warms up (compiles, caches) and is not counted
            for name, kw in modes(n, set(tok.eos_token_ids)).items():
                kw = dict(kw)
                plan.AUTO_TOOLS = kw.pop("_auto", plan.AUTO_TOOLS)
                prep = eng.prepare(GenerationRequest(messages=msgs, max_tokens=n, **kw))
                done = [e for e in eng.generate(prep) if isinstance(e, Done)][0]
                c = prep.constraint
                if r:
                    results.setdefault(name, []).append(
                        (done.timings.decode_tps, done.usage.completion_tokens,
                         (c.mask_s / c.steps * 1e3) if c is not None and c.steps else 0.0))
    finally:
        eng.close()
        plan.AUTO_TOOLS = True
    rows = []
    best = {name: max(t for t, _, _ in vals) for name, vals in results.items()}
    peer = {"free": "free", "json_schema": "free", "free_tools": "free_tools", "auto_tools": "free_tools"}
    for name, vals in results.items():
        rows.append({"model": label, "mode": name, "tokens": vals[0][1], "decode_tps": round(best[name], 1),
                     "vs_peer": round(best[name] / best[peer[name]], 3), "peer": peer[name],
                     "mask_ms_per_token": round(statistics.median(m for _, _, m in vals), 3)})
    return rows


def k2_vocab_masks(n_tokens: int = 200) -> list[dict]:
    """Mask time per token with a 163,840-id vocabulary: K2's size. The vocabulary is synthetic
    (the 256 bytes, then words and word pieces of this machine's Python sources until 163,584 base
    ids, then K2's 256 special slots), since K2's tiktoken.model is not available offline."""
    import glob
    import re

    import llguidance
    import numpy as np

    from k2mlx.grammar.spec import ReplySpec, Tool, to_lark

    words: dict[bytes, None] = {bytes([b]): None for b in range(256)}
    for f in glob.glob("/usr/lib/python3*/**/*.py", recursive=True) + glob.glob("/root/.pyenv/versions/*/lib/python3*/**/*.py", recursive=True):
        try:
            text = open(f, encoding="utf-8", errors="ignore").read()
        except OSError:
            continue
        for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text):
            b = w.encode()
            for k in range(2, min(len(b), 16) + 1):
                words.setdefault(b[:k], None)
            if len(words) >= 163_584:
                break
        if len(words) >= 163_584:
            break
    tokens = list(words)[:163_584]
    specials = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>"] + \
               [f"<|reserved_token_{i}|>" for i in range(5, 11)] + \
               ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
    specials += [f"<|reserved_token_{i}|>" for i in range(len(specials), 256)]
    base = len(tokens)
    tokens += [s.encode() for s in specials]
    by_bytes = {t: i for i, t in enumerate(tokens[:base])}

    class Vocab:
        def __init__(self):
            self.tokens, self.eos_token_id, self.bos_token_id = tokens, base + 1, base
            self.special_token_ids = list(range(base, base + 256))

        def __call__(self, s):  # greedy longest match: good enough for forced strings
            b = s if isinstance(s, bytes) else s.encode()
            out, i = [], 0
            while i < len(b):
                for k in range(min(16, len(b) - i), 0, -1):
                    if b[i:i + k] in by_bytes:
                        out.append(by_bytes[b[i:i + k]])
                        i += k
                        break
            return out

    lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()), eos_token=[base + 1, base + 2])
    docs = {
        "json_schema": (ReplySpec(content={"type": "object", "properties": {"items": {"type": "array", "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}}}}}}),
            json.dumps({"items": [{"name": f"item number {i}", "qty": i} for i in range(40)]}, separators=(",", ":"))),
        "auto_tools (text)": (ReplySpec(tools=[Tool("get_weather", TOOLS[0]["function"]["parameters"])], choice="auto"),
                              "Sure, here is a long plain answer about the weather in many cities. " * 20),
    }
    rows = []
    for name, (spec, text) in docs.items():
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(to_lark(spec)), log_level=0)
        ids = lt.tokenize_str(text)[:n_tokens]
        words_buf = np.zeros(((len(tokens) + 31) // 32,), dtype=np.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(words_buf.ctypes.data, words_buf.nbytes)
            np.unpackbits(words_buf.view(np.uint8), bitorder="little")
            times.append(time.perf_counter() - t0)
            if not m.consume_token(t):
                break
        rows.append({"vocab": len(tokens), "grammar": name, "tokens": len(times),
                     "mask_ms_median": round(statistics.median(times) * 1e3, 3),
                     "mask_ms_p95": round(sorted(times)[int(len(times) * 0.95)] * 1e3, 3)})
    return rows


def nano_eval(n: int) -> list[dict]:
    """k2-nano's held-out arithmetic tool calls through `k2mlx serve` (k2mlx.nano.evaluate), with
    tool calls under tool_choice auto constrained and not."""
    import os

    from k2mlx.nano.evaluate import run_serve_eval

    rows = []
    for on in ("0", "1"):
        os.environ["K2MLX_CONSTRAIN_AUTO_TOOLS"] = on  # read by the server process at import
        rows.append({"k2-nano serve eval": "constrained" if on == "1" else "free", **run_serve_eval(n=n)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k2-vocab", action="store_true", help="also time masks at K2's vocabulary size")
    ap.add_argument("--nano-eval", type=int, default=0, metavar="N",
                    help="only score k2-nano's held-out tool calls (N cases) free and constrained")
    args = ap.parse_args()
    if args.nano_eval:
        for r in nano_eval(args.nano_eval):
            print(json.dumps({k: v for k, v in r.items() if k != "failures"}))
        return
    from k2mlx.tiny import make_tiny_checkpoint

    rows = run_engine("k2-nano (default)", None, args.tokens, args.rounds)
    with tempfile.TemporaryDirectory() as d:
        rows += run_engine("tiny small preset", make_tiny_checkpoint(d, preset="small", seed=0), args.tokens, args.rounds)
    for r in rows:
        print(json.dumps(r))
    if args.k2_vocab:
        for r in k2_vocab_masks():
            print(json.dumps(r))


if __name__ == "__main__":
    main()
