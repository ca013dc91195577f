"""Engine events -> OpenAI chat chunks / completion chunks / Anthropic stream events, and the
matching non-streaming bodies. Pure functions of the event stream (no HTTP, no MLX), so they
are tested by driving the real chat parser with token streams."""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid

from k2mlx.engine.events import (Done, ParseWarning, ReasoningDelta, TextDelta, ToolCallArgsDelta, ToolCallBegin,
                                 ToolCallEnd)

FINISH_TO_ANTHROPIC = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies and timers see bytes


def progress_comment(ev) -> str:
    """A PrefillProgress event as an SSE comment (OpenAI streams have no event for it)."""
    eta = f" eta {ev.eta_s:.1f}s" if ev.eta_s is not None else ""
    return f": prefill {ev.done}/{ev.total}{eta}\n\n"


async def paced(stream, interval: float):
    """The stream's events, with None in place of each `interval` seconds without one (queue wait,
    prefill, a slow step), so the caller can send a keep-alive. The pending read is never
    cancelled by the wait (cancelling it would cancel the request)."""
    it = stream.__aiter__()
    nxt = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                ev = nxt.result()
            except StopAsyncIteration:
                return
            finally:
                if nxt.done():
                    nxt = None
            yield ev
    finally:
        if nxt is not None:
            nxt.cancel()  # the client went away mid-wait: the request is cancelled with it


def usage_dict(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def timings_dict(t) -> dict:
    """The engine's measured speeds (llama.cpp-style extra field; OpenAI clients ignore it).
    The TUI's status bar reads it."""
    return {"prompt_tokens": t.prompt_tokens, "generated_tokens": t.generated_tokens,
            "prefill_s": round(t.prefill_s, 6), "decode_s": round(t.decode_s, 6),
            "prefill_tps": round(t.prefill_tps, 3), "decode_tps": round(t.decode_tps, 3)}


def _lp(v: float) -> float:
    """A logprob JSON can carry: a masked token's -inf is -9999.0, as OpenAI writes it."""
    return v if math.isfinite(v) else -9999.0


def _lp_entries(logprobs) -> list[dict]:
    out = []
    for text, lp, tops in logprobs or ():
        out.append({"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8", "replace")),
                    "top_logprobs": [{"token": t, "logprob": _lp(v), "bytes": list(t.encode("utf-8", "replace"))}
                                     for t, v in tops]})
    return out


def finish_reason(done: Done) -> str:
    return done.finish_reason if done.finish_reason in ("stop", "length", "tool_calls") else "stop"


class ChatStream:
    """OpenAI chat.completion.chunk objects for one streamed reply."""

    def __init__(self, model: str, include_usage: bool = False, want_logprobs: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.model, self.created = model, int(time.time())
        self.include_usage, self.want_logprobs = include_usage, want_logprobs
        self._args: dict[int, str] = {}  # argument text streamed so far per tool call
        self._began: set[int] = set()

    def _chunk(self, delta: dict | None, finish=None, logprobs=None, usage=None, choices=True) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "system_fingerprint": "k2mlx"}
        c["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}] if choices else []
        if self.include_usage:
            c["usage"] = usage
        return c

    def first(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def map(self, ev) -> list[dict]:
        if isinstance(ev, TextDelta):
            lp = {"content": _lp_entries(ev.logprobs)} if self.want_logprobs and ev.logprobs else None
            if not ev.text and lp is None:
                return []
            return [self._chunk({"content": ev.text}, logprobs=lp)]
        if isinstance(ev, ReasoningDelta):
            return [self._chunk({"reasoning_content": ev.text})] if ev.text else []
        if isinstance(ev, ToolCallBegin):
            self._began.add(ev.index)
            self._args[ev.index] = ""
            return [self._chunk({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                 "function": {"name": ev.name, "arguments": ""}}]})]
        if isinstance(ev, ToolCallArgsDelta):
            if not ev.text:
                return []
            self._args[ev.index] = self._args.get(ev.index, "") + ev.text
            return [self._chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})]
        if isinstance(ev, ToolCallEnd):
            sent = self._args.get(ev.index, "")
            if ev.arguments.startswith(sent) and len(ev.arguments) > len(sent):
                rest = ev.arguments[len(sent):]
                self._args[ev.index] = ev.arguments
                return [self._chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": rest}}]})]
            return []
        if isinstance(ev, Done):
            last = self._chunk({}, finish=finish_reason(ev))
            last["timings"] = timings_dict(ev.timings)
            if ev.constrained:  # a k2mlx extra, like timings: the reply followed a grammar
                last["constrained"] = True
            out = [last]
            if self.include_usage:
                out.append(self._chunk(None, usage=usage_dict(ev.usage), choices=False))
            return out
        return []  # ParseWarning: logged by the caller


class ChatCollector:
    """The non-streaming chat.completion body."""

    def __init__(self, model: str, want_logprobs: bool = False):
        self.model, self.want_logprobs = model, want_logprobs
        self.text, self.reasoning, self.lp = [], [], []
        self.calls: dict[int, dict] = {}
        self.warnings: list[str] = []

    def add(self, ev) -> None:
        if isinstance(ev, TextDelta):
            self.text.append(ev.text)
            if ev.logprobs:
                self.lp += _lp_entries(ev.logprobs)
        elif isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
        elif isinstance(ev, ToolCallBegin):
            self.calls[ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
        elif isinstance(ev, ToolCallArgsDelta) and ev.index in self.calls:
            self.calls[ev.index]["function"]["arguments"] += ev.text
        elif isinstance(ev, ToolCallEnd) and ev.index in self.calls:
            self.calls[ev.index]["function"]["arguments"] = ev.arguments
        elif isinstance(ev, ParseWarning):
            self.warnings.append(ev.message)

    def body(self, done: Done) -> dict:
        msg = {"role": "assistant", "content": "".join(self.text)}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            msg["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
            if not msg["content"]:
                msg["content"] = None
        choice = {"index": 0, "message": msg, "finish_reason": finish_reason(done),
                  "logprobs": {"content": self.lp} if self.want_logprobs else None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model, "system_fingerprint": "k2mlx", "choices": [choice], "usage": usage_dict(done.usage),
                "timings": timings_dict(done.timings), **({"constrained": True} if done.constrained else {})}


def completion_logprobs(entries: list[tuple], offset: int) -> dict:
    tokens, lps, tops, offs = [], [], [], []
    for text, lp, top in entries:
        tokens.append(text)
        lps.append(_lp(lp))
        tops.append({t: _lp(v) for t, v in top})
        offs.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


class CompletionStream:
    """OpenAI text_completion chunks (the stream of /v1/completions)."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.model, self.created, self.include_usage = model, int(time.time()), include_usage
        self.offset = 0

    def chunk(self, text: str, finish=None, logprobs=None, usage=None, choices=True) -> dict:
        c = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
             "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}] if choices else []}
        if self.include_usage:
            c["usage"] = usage
        return c

    def map(self, ev) -> list[dict]:
        if isinstance(ev, TextDelta) and (ev.text or ev.logprobs):
            lp = completion_logprobs(list(ev.logprobs), self.offset) if ev.logprobs else None
            self.offset += len(ev.text)
            return [self.chunk(ev.text, logprobs=lp)]
        if isinstance(ev, Done):
            out = [self.chunk("", finish=finish_reason(ev))]
            if self.include_usage:
                out.append(self.chunk("", usage=usage_dict(ev.usage), choices=False))
            return out
        return []


# ---- Anthropic -----------------------------------------------------------------------------------
def anthropic_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def anthropic_usage(u) -> dict:
    """Anthropic counts cache reads apart: `input_tokens` are the prompt tokens computed afresh, so
    input_tokens + cache_read_input_tokens is the prompt (the engine's prompt_tokens counts all)."""
    return {"input_tokens": max(0, u.prompt_tokens - u.cached_tokens), "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def _stop_reason(done: Done) -> str:
    if done.finish_reason == "stop" and done.stop_sequence:
        return "stop_sequence"
    return FINISH_TO_ANTHROPIC.get(done.finish_reason, "end_turn")


class AnthropicStream:
    """Anthropic Messages streaming events: message_start, content blocks (thinking, text,
    tool_use) each opened, delta'd and stopped, message_delta with the stop reason, message_stop."""

    def __init__(self, model: str, prompt_tokens: int):
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model, self.prompt_tokens = model, prompt_tokens
        self._block = -1
        self._kind: str | None = None  # kind of the open block
        self._tool_index: int | None = None

    def start(self) -> list[str]:
        msg = {"id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return [anthropic_event("message_start", {"type": "message_start", "message": msg})]

    def _open(self, kind: str, block: dict) -> list[str]:
        out = self._close()
        self._block += 1
        self._kind = kind
        out.append(anthropic_event("content_block_start",
                                   {"type": "content_block_start", "index": self._block, "content_block": block}))
        return out

    def _close(self) -> list[str]:
        if self._kind is None:
            return []
        self._kind = None
        return [anthropic_event("content_block_stop", {"type": "content_block_stop", "index": self._block})]

    def _delta(self, delta: dict) -> str:
        return anthropic_event("content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta})

    def map(self, ev) -> list[str]:
        out: list[str] = []
        if isinstance(ev, TextDelta) and ev.text:
            if self._kind != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": ev.text}))
        elif isinstance(ev, ReasoningDelta) and ev.text:
            if self._kind != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
        elif isinstance(ev, ToolCallBegin):
            out += self._open("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
            self._tool_index, self._sent = ev.index, ""
        elif isinstance(ev, ToolCallArgsDelta) and self._kind == "tool_use" and ev.text:
            self._sent += ev.text
            out.append(self._delta({"type": "input_json_delta", "partial_json": ev.text}))
        elif isinstance(ev, ToolCallEnd) and self._kind == "tool_use":
            if ev.arguments.startswith(self._sent) and len(ev.arguments) > len(self._sent):
                out.append(self._delta({"type": "input_json_delta", "partial_json": ev.arguments[len(self._sent):]}))
            out += self._close()
        elif isinstance(ev, Done):
            out += self._close()
            out.append(anthropic_event("message_delta", {
                "type": "message_delta", "delta": {"stop_reason": _stop_reason(ev), "stop_sequence": ev.stop_sequence},
                "usage": anthropic_usage(ev.usage)}))
            out.append(anthropic_event("message_stop", {"type": "message_stop"}))
        return out


def anthropic_body(model: str, events: list, done: Done) -> dict:
    content: list[dict] = []
    for ev in events:
        if isinstance(ev, TextDelta) and ev.text:
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += ev.text
            else:
                content.append({"type": "text", "text": ev.text})
        elif isinstance(ev, ReasoningDelta) and ev.text:
            if content and content[-1]["type"] == "thinking":
                content[-1]["thinking"] += ev.text
            else:
                content.append({"type": "thinking", "thinking": ev.text, "signature": ""})
        elif isinstance(ev, ToolCallBegin):
            content.append({"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
        elif isinstance(ev, ToolCallEnd):
            for block in reversed(content):
                if block["type"] == "tool_use":
                    try:
                        parsed = json.loads(ev.arguments) if ev.arguments.strip() else {}
                    except ValueError:
                        parsed = {"_raw": ev.arguments}
                    block["input"] = parsed if isinstance(parsed, dict) else {"value": parsed}
                    break
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": _stop_reason(done), "stop_sequence": done.stop_sequence,
            "usage": anthropic_usage(done.usage)}
