"""Held-out evaluation of k2-nano.

- `serve_eval`: end to end through `k2mlx serve` with the official openai client, on arithmetic
  cases generated with a seed the training never used. Per case, turn 1 (temperature 0, the
  calculator declared among other tools) must finish with "tool_calls", name `calculator` and
  pass JSON arguments whose expression evaluates to the right number; turn 2 (the call plus a
  tool message with the result) must answer with text containing that number.
- `greedy_agreement`: the 4-bit model's greedy outputs against the float model's, in process.
- `greedy` / `score_in_process`: the same arithmetic scoring without a server (quick checks).
- `first_use_eval`: what a newcomer types first ("Hello! What can you do?", "who are you"...)
  must get a reply of >= 3 words and no tool call, with no tools and with `k2mlx chat`'s.
- `multiturn_cases` / `multiturn_in_process` / `multiturn_serve_eval`: after a tool turn, a
  greeting gets words (no tool call), a file question the file tool with the right path, a new
  sum the calculator with the new numbers.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from k2mlx.nano.data import Conversation, arithmetic_cases, generate, safe_eval

EVAL_SEED = 1_000_003  # never a training seed


def _number_in(text: str, value) -> bool:
    import re

    return str(value) in re.findall(r"-?\d+", text or "")


def _args_value(arguments: str):
    try:
        args = json.loads(arguments)
        return safe_eval(str(args["expression"]))
    except (ValueError, KeyError, TypeError):
        return None


# -- in process --------------------------------------------------------------------------------

def greedy(model, tokenizer, prompt: list[int], max_tokens: int = 64) -> list[int]:
    """Greedy decode with the model's latent cache until an end-of-turn token."""
    import mlx.core as mx

    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        if tok in tokenizer.eos_token_ids:
            break
        logits = model(mx.array([[tok]]), cache)
    return out


def prompt_tokens(tokenizer, messages, tools) -> list[int]:
    from k2mlx.chat.template import render_tokens

    return render_tokens(tokenizer, messages, tools, add_generation_prompt=True)


def eval_prompts(n: int, seed: int = EVAL_SEED) -> list[tuple[list[dict], list | None]]:
    """Held-out prompts of every kind (first assistant turn of each conversation)."""
    out = []
    for c in generate(n, seed):
        first = next(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
        out.append((c.messages[:first], c.tools))
    return out


def greedy_agreement(model_a, model_b, tokenizer, n: int = 60, seed: int = EVAL_SEED, max_tokens: int = 48) -> dict:
    """Fraction of held-out prompts on which two models' greedy outputs are identical."""
    same = 0
    diffs = []
    for messages, tools in eval_prompts(n, seed):
        p = prompt_tokens(tokenizer, messages, tools)
        a, b = greedy(model_a, tokenizer, p, max_tokens), greedy(model_b, tokenizer, p, max_tokens)
        same += a == b
        if a != b and len(diffs) < 5:
            diffs.append((tokenizer.decode(a), tokenizer.decode(b)))
    return {"prompts": n, "identical": same, "rate": same / n, "examples": diffs}


def score_in_process(model, tokenizer, n: int = 50, seed: int = EVAL_SEED) -> dict:
    """Arithmetic tool-call scores without a server (parser from k2mlx.chat)."""
    from k2mlx.chat.parser import parse_all
    from k2mlx.engine.events import TextDelta, ToolCallBegin, ToolCallEnd

    calls_ok = answers_ok = 0
    for case in arithmetic_cases(n, seed):
        value = case.meta["value"]
        prompt = case.messages[:-3]
        events = parse_all(tokenizer, greedy(model, tokenizer, prompt_tokens(tokenizer, prompt, case.tools)))
        names = [e.name for e in events if isinstance(e, ToolCallBegin)]
        args = [e.arguments for e in events if isinstance(e, ToolCallEnd)]
        if names == ["calculator"] and args and _args_value(args[0]) == value:
            calls_ok += 1
        turn2 = case.messages[:-1]  # the reference call and the tool's result
        events = parse_all(tokenizer, greedy(model, tokenizer, prompt_tokens(tokenizer, turn2, case.tools)))
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        answers_ok += _number_in(text, value)
    return {"cases": n, "tool_call_rate": calls_ok / n, "answer_rate": answers_ok / n}


# -- through `k2mlx serve` ----------------------------------------------------------------------

@dataclass
class ServeScores:
    cases: int = 0
    finish_tool_calls: int = 0
    right_tool: int = 0
    right_value: int = 0
    call_ok: int = 0  # all three at once
    answer_ok: int = 0
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        n = max(self.cases, 1)
        return {"cases": self.cases, "finish_reason_tool_calls": self.finish_tool_calls / n,
                "right_tool_name": self.right_tool / n, "arguments_evaluate_right": self.right_value / n,
                "tool_call_rate": self.call_ok / n, "answer_rate": self.answer_ok / n,
                "failures": self.failures[:8]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`k2mlx serve --model PATH` in a subprocess on a free loopback port."""

    def __init__(self, model_path: str | Path | None = None, timeout: float = 180.0):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "k2mlx.cli", "serve", "--port", str(self.port)]
        if model_path is not None:
            cmd += ["--model", str(model_path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._wait(timeout)

    def _wait(self, timeout: float):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"k2mlx serve exited with {self.proc.returncode}: {err}")
            try:
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        raise TimeoutError(f"k2mlx serve did not answer on {self.base_url} within {timeout:.0f} s")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve_eval(base_url: str, cases: list[Conversation], model: str = "k2-nano") -> ServeScores:
    """Both turns of every case through the OpenAI client at temperature 0."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="k2mlx")
    s = ServeScores()
    for case in cases:
        value = case.meta["value"]
        prompt = case.messages[:-3]
        s.cases += 1
        r = client.chat.completions.create(model=model, messages=prompt, tools=case.tools, temperature=0,
                                           max_tokens=64)
        ch = r.choices[0]
        calls = ch.message.tool_calls or []
        finish = ch.finish_reason == "tool_calls"
        name = bool(calls) and calls[0].function.name == "calculator"
        right = bool(calls) and _args_value(calls[0].function.arguments) == value
        s.finish_tool_calls += finish
        s.right_tool += name
        s.right_value += right
        s.call_ok += finish and name and right
        if not (finish and name and right) and len(s.failures) < 20:
            s.failures.append({"prompt": prompt[-1]["content"], "finish": ch.finish_reason,
                               "content": ch.message.content,
                               "calls": [(c.function.name, c.function.arguments) for c in calls]})
        # Turn 2: the model's own call when it made one (else the reference call) + the result.
        if calls:
            call = {"role": "assistant", "content": ch.message.content or "",
                    "tool_calls": [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in calls[:1]]}
            tool_msg = {"role": "tool", "tool_call_id": calls[0].id, "content": str(value)}
        else:
            call, tool_msg = case.messages[-3], case.messages[-2]
        r2 = client.chat.completions.create(model=model, messages=prompt + [call, tool_msg], tools=case.tools,
                                            temperature=0, max_tokens=64)
        text = r2.choices[0].message.content or ""
        ok = _number_in(text, value)
        s.answer_ok += ok
        if not ok and len(s.failures) < 20:
            s.failures.append({"prompt": prompt[-1]["content"], "answer": text, "value": value})
    return s


def run_serve_eval(model_path=None, n: int = 60, seed: int = EVAL_SEED) -> dict:
    with Server(model_path) as srv:
        return serve_eval(srv.base_url, arithmetic_cases(n, seed)).as_dict()


# -- first-use prompts and multi-turn chats --------------------------------------------------------

# What a newcomer types first, the README's example first. Some are training wordings, some are
# not (marked): both must get a real reply, not an empty one or a tool call.
FIRST_USE_PROMPTS = [
    "Hello! What can you do?",  # the README's example
    "hello what can you do", "Hi!", "hi", "hey", "Hello", "who are you", "Who are you?",
    "what can you do", "What can you do?", "Hi, who are you?", "what are you",
    "Good morning", "Tell me about yourself.",
    # not in the training data in these words:
    "hello!", "Hey, who are you?", "HELLO", "hi there, what can you do?", "Hello, what can you do?",
    "What can you help with?",
]


def words(text: str) -> int:
    return len((text or "").split())


def reply(model, tokenizer, messages, tools, max_tokens: int = 64) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(tool name, arguments)]) of a greedy reply, in process, parsed as serve parses it."""
    from k2mlx.chat.parser import parse_all
    from k2mlx.engine.events import TextDelta, ToolCallBegin, ToolCallEnd

    events = parse_all(tokenizer, greedy(model, tokenizer, prompt_tokens(tokenizer, messages, tools), max_tokens))
    names = [e.name for e in events if isinstance(e, ToolCallBegin)]
    args = [e.arguments for e in events if isinstance(e, ToolCallEnd)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), list(zip(names, args))


def first_use_eval(model, tokenizer, prompts=FIRST_USE_PROMPTS) -> dict:
    """Each prompt as `k2mlx generate` sends it (no tools, no system) and as `k2mlx chat` sends it
    (its system prompt and tools): a reply passes with >= 3 words and no tool call."""
    from k2mlx.nano.data import TUI_SYSTEM, TUI_TOOLS

    out = {}
    for name, prefix, tools in (("plain", [], None),
                                ("chat", [{"role": "system", "content": TUI_SYSTEM}], TUI_TOOLS)):
        ok, fails = 0, []
        for p in prompts:
            text, calls = reply(model, tokenizer, prefix + [{"role": "user", "content": p}], tools)
            good = words(text) >= 3 and not calls
            ok += good
            if not good:
                fails.append((p, text, calls))
        out[name] = {"prompts": len(prompts), "ok": ok, "failures": fails[:8]}
    return out


@dataclass
class TurnCase:
    """A chat whose last user turn follows a tool turn, and what the reply must do: "chat" (words,
    no tool call), or call `tool` with `args` ("calculator": arguments evaluating to `value`)."""
    messages: list[dict]
    tools: list[dict]
    expect: str  # "chat", "list_dir", "read_file" or "calculator"
    args: dict | None = None
    value: int | None = None


def multiturn_cases(n: int, seed: int = EVAL_SEED) -> list[TurnCase]:
    """Held-out chats: a tool turn (a sum or a file question, with its call, result and answer),
    then a greeting, a file question or a new sum. The tools are the TUI's (with its system
    prompt) or a random declaration with the calculator and the file tools. The issue's own
    cases come first: "Hi!" and "Show me the files in docs." after a sum."""
    import random

    from k2mlx.nano.data import _FIRST_USE, _GREETINGS, TUI_SYSTEM, TUI_TOOLS, Generator

    g = Generator(seed)
    r = random.Random(seed)
    greetings = [q for q, _ in _GREETINGS[:6] + _FIRST_USE] + ["hi", "Thanks!", "hello there!"]
    cases = []
    for i in range(n):
        g._call_index = 0
        tui = i % 2 == 0
        tools = list(TUI_TOOLS) if tui else g._tools(["calculator", "list_dir", "read_file"])
        prefix = [{"role": "system", "content": TUI_SYSTEM}] if tui else g._prefix()
        first = g.arithmetic_exchange()[0] if i % 3 != 2 else g.list_dir(tools=tools)[0]
        history = prefix + first
        expect = ("chat", "list_dir", "calculator", "chat", "read_file", "calculator")[i % 6] if i >= 2 else \
            ("chat", "list_dir")[i]
        if i < 2:  # the cases
            history = prefix + g.arithmetic_exchange()[0]
            text = ("Hi!", "Show me the files in docs.")[i]
            cases.append(TurnCase(history + [{"role": "user", "content": text}], tools, expect,
                                  args={"path": "docs"} if i else None))
            continue
        if expect == "chat":
            cases.append(TurnCase(history + [{"role": "user", "content": r.choice(greetings)}], tools, "chat"))
        elif expect == "calculator":
            msgs, meta = g.arithmetic_exchange(followup=r.random() < 0.5)
            cases.append(TurnCase(history + msgs[:1], tools, "calculator", value=meta["value"]))
        else:
            msgs, _, meta = getattr(g, expect)(tools=tools)
            cases.append(TurnCase(history + msgs[:1], tools, expect, args={"path": meta["path"]}))
    return cases


def turn_ok(case: TurnCase, text: str, calls: list[tuple[str, str]]) -> bool:
    if case.expect == "chat":
        return not calls and words(text) >= 2
    if len(calls) != 1 or calls[0][0] != case.expect:
        return False
    if case.expect == "calculator":
        return _args_value(calls[0][1]) == case.value
    try:
        return json.loads(calls[0][1]) == case.args
    except ValueError:
        return False


def _tally(results) -> dict:
    """results: [(case, ok, text, calls)] -> per expected kind and overall."""
    out: dict = {}
    for case, ok, _, _ in results:
        k = out.setdefault(case.expect, [0, 0])
        k[0] += ok
        k[1] += 1
    fails = [{"last": c.messages[-1]["content"], "expect": c.expect, "text": t, "calls": calls}
             for c, ok, t, calls in results if not ok]
    return {"cases": len(results), "ok": sum(ok for _, ok, _, _ in results),
            "by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(out.items())},
            "passed": [ok for _, ok, _, _ in results], "failures": fails[:8]}


def multiturn_in_process(model, tokenizer, n: int = 60, seed: int = EVAL_SEED) -> dict:
    results = []
    for case in multiturn_cases(n, seed):
        text, calls = reply(model, tokenizer, case.messages, case.tools)
        results.append((case, turn_ok(case, text, calls), text, calls))
    return _tally(results)


def multiturn_serve_eval(base_url: str, cases: list[TurnCase], model: str = "k2-nano") -> dict:
    """The same cases through `k2mlx serve` with the openai client, temperature 0."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="k2mlx")
    results = []
    for case in cases:
        r = client.chat.completions.create(model=model, messages=case.messages, tools=case.tools,
                                           temperature=0, max_tokens=64)
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or ()]
        results.append((case, turn_ok(case, m.content or "", calls), m.content or "", calls))
    return _tally(results)
