"""Request bodies (OpenAI chat and completions, Anthropic messages) -> `GenerationRequest`.

Hand-written checks instead of a schema library so every wrong field gives one clear 400 naming
the field, and unknown fields are simply ignored (clients send many we do not use)."""
from __future__ import annotations

import json
import math
from typing import Any

from k2mlx.engine.request import GenerationRequest, SamplingParams
from k2mlx.server.errors import HTTPError

JSON_HINT = "Respond with a single valid JSON object and nothing else."
FIM_SYSTEM = ("You are a code completion engine. The user gives the text before the cursor in <prefix> and the "
              "text after it in <suffix>. Reply with exactly the text that belongs at the cursor, nothing else.")
_RESERVED_KWARGS = {"messages", "tools", "add_generation_prompt", "template", "thinking", "native_ids",
                    "use_template", "tokenizer"}
DEFAULT_TEMPERATURE = 0.6  # K2's recommended value when a client sends none


def bad(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, message, code="invalid_request", param=param)


def get(body: dict, key: str, types, default=None, *, nullable: bool = True):
    v = body.get(key, default)
    if v is None:
        if not nullable and key in body:
            raise bad(f"'{key}' must not be null", key)
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(f"'{key}' has the wrong type (boolean)", key)
    if not isinstance(v, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise bad(f"'{key}' must be of type {names}, got {type(v).__name__}", key)
    return v


def number(body: dict, key: str, default, lo: float, hi: float):
    v = get(body, key, (int, float), default)
    if v is None:
        return None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


def integer(body: dict, key: str, default, lo: int, hi: int):
    v = get(body, key, int, default)
    if v is None:
        return None
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be an integer between {lo} and {hi}, got {v}", key)
    return v


def stops(body: dict, key: str) -> list[str]:
    v = body.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 16 or any(not isinstance(s, str) or not s for s in v):
        raise bad(f"'{key}' must be a non-empty string or a list of up to 16 of them", key)
    return v


def sampling(body: dict, top_k_key: str = "top_k") -> SamplingParams:
    bias: dict[int, float] = {}
    lb = get(body, "logit_bias", dict, {})
    for k, val in lb.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not -100 <= val <= 100:
            raise bad(f"'logit_bias' values must be numbers between -100 and 100, got {val!r}", "logit_bias")
        bias[tid] = float(val)
    return SamplingParams(
        temperature=float(number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)),
        top_p=float(number(body, "top_p", 1.0, 0.0, 1.0)),
        top_k=integer(body, top_k_key, 0, 0, 1 << 30),
        min_p=float(number(body, "min_p", 0.0, 0.0, 1.0)),
        seed=integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        logit_bias=bias,
    )


def max_tokens(body: dict, *keys: str, required: bool = False) -> int | None:
    for key in keys:
        v = integer(body, key, None, 1, 1 << 31)
        if v is not None:
            return v
    if required:
        raise bad(f"'{keys[0]}' is required", keys[0])
    return None


def _n(body: dict) -> None:
    if integer(body, "n", 1, 1, 128) != 1:
        raise bad("only n=1 is supported", "n")


def chat_request(body: dict) -> tuple[GenerationRequest, dict]:
    """OpenAI /v1/chat/completions -> (request, options for the response)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    _n(body)
    tools = get(body, "tools", list)
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            raise bad(f"tools[{i}] must be an object", "tools")
    choice = body.get("tool_choice", "auto")
    if choice is None:
        choice = "auto"
    if not (choice in ("auto", "none", "required") or isinstance(choice, dict)):
        raise bad(f"'tool_choice' must be auto, none, required or a function, got {choice!r}", "tool_choice")
    rf = get(body, "response_format", dict)
    if rf is not None:
        kind = rf.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise bad(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}", "response_format")
        if kind != "text":
            hint = JSON_HINT
            schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
            if schema is not None:
                hint += " It must follow this JSON schema: " + json.dumps(schema, ensure_ascii=False)
            messages = [{"role": "system", "content": hint}] + list(messages)
    so = get(body, "stream_options", dict, {})
    logprobs = get(body, "logprobs", bool, False)
    top = integer(body, "top_logprobs", 0, 0, 20)
    chat_kwargs = {}
    if isinstance(body.get("chat_template_kwargs"), dict):
        chat_kwargs = {k: v for k, v in body["chat_template_kwargs"].items()
                       if isinstance(k, str) and k.isidentifier() and k not in _RESERVED_KWARGS}
    req = GenerationRequest(
        messages=messages, tools=tools or None, tool_choice=choice,
        parallel_tool_calls=get(body, "parallel_tool_calls", bool, True),
        max_tokens=max_tokens(body, "max_completion_tokens", "max_tokens"),
        sampling=sampling(body), stop=stops(body, "stop"), logprobs=logprobs, top_logprobs=top if logprobs else 0,
        chat_kwargs=chat_kwargs, response_format=rf if rf is not None and rf.get("type") != "text" else None,
    )
    opts = {"stream": get(body, "stream", bool, False), "include_usage": bool(so.get("include_usage"))}
    return req, opts


def completion_request(body: dict) -> tuple[GenerationRequest, dict]:
    """OpenAI /v1/completions. With `suffix` (editor fill-in-the-middle) K2, which has no FIM
    tokens, is asked in its chat format for the text between prefix and suffix."""
    _n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    tokens = None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens, prompt = prompt, None
    elif not isinstance(prompt, str):
        raise bad("'prompt' must be a string, a list with one string, or a list of token ids", "prompt")
    suffix = get(body, "suffix", str)
    lp = integer(body, "logprobs", None, 0, 20)
    common = dict(max_tokens=max_tokens(body, "max_tokens") or 16, sampling=sampling(body), stop=stops(body, "stop"),
                  logprobs=lp is not None, top_logprobs=lp or 0)
    if suffix is not None and prompt is not None:
        user = f"<prefix>{prompt}</prefix><suffix>{suffix}</suffix>"
        req = GenerationRequest(messages=[{"role": "system", "content": FIM_SYSTEM}, {"role": "user", "content": user}],
                                tool_choice="none", **common)
    elif tokens is not None:
        req = GenerationRequest(prompt_tokens=tokens, parse=False, **common)
    else:
        if not prompt:
            raise bad("'prompt' is empty", "prompt")
        req = GenerationRequest(prompt=prompt, parse=False, **common)
    so = get(body, "stream_options", dict, {})
    opts = {"stream": get(body, "stream", bool, False), "include_usage": bool(so.get("include_usage")),
            "echo": get(body, "echo", bool, False) and prompt is not None and suffix is None, "prompt": prompt}
    return req, opts


# ---- Anthropic ---------------------------------------------------------------------------------
def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content blocks", "messages")
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise bad(f"{where}.content[{j}] must be a content block with a type", "messages")
    return content


def _text(blocks: list[dict], where: str) -> str:
    out = []
    for j, b in enumerate(blocks):
        if b["type"] == "text":
            if not isinstance(b.get("text"), str):
                raise bad(f"{where}.content[{j}].text must be a string", "messages")
            out.append(b["text"])
        elif b["type"] in ("image", "document"):
            raise bad(f"{where}.content[{j}]: K2 is a text model; {b['type']} blocks are not supported", "messages")
    return "".join(out)


def anthropic_messages(body: dict) -> list[dict]:
    """Anthropic messages (+ system) -> OpenAI-style messages for the chat template."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        s = _text(_blocks(system, "system"), "system")
        if s:
            out.append({"role": "system", "content": s})
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"{where}.role must be 'user' or 'assistant'", "messages")
        blocks = _blocks(m.get("content"), where)
        if m["role"] == "assistant":
            calls, thinking = [], ""
            for j, b in enumerate(blocks):
                if b["type"] == "tool_use":
                    if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                        raise bad(f"{where}.content[{j}] tool_use needs a name and an input object", "messages")
                    calls.append({"id": b.get("id") if isinstance(b.get("id"), str) else None, "type": "function",
                                  "function": {"name": b["name"],
                                               "arguments": json.dumps(b.get("input", {}), ensure_ascii=False)}})
                elif b["type"] == "thinking" and isinstance(b.get("thinking"), str):
                    thinking += b["thinking"]
            msg = {"role": "assistant", "content": _text(blocks, where)}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning_content"] = thinking
            out.append(msg)
            continue
        text_parts = []
        for j, b in enumerate(blocks):
            if b["type"] == "tool_result":
                if not isinstance(b.get("tool_use_id"), str):
                    raise bad(f"{where}.content[{j}].tool_use_id must be a string", "messages")
                c = b.get("content", "")
                c = c if isinstance(c, str) else _text(_blocks(c, f"{where}.content[{j}]"), where)
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": c})
            elif b["type"] == "text":
                text_parts.append(_text([b], where))
            elif b["type"] in ("image", "document"):
                _text([b], where)
        if text_parts or not any(b["type"] == "tool_result" for b in blocks):
            out.append({"role": "user", "content": "".join(text_parts)})
    return out


def anthropic_tools(body: dict) -> tuple[list[dict] | None, Any]:
    tools = get(body, "tools", list)
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tools[{i}] must be an object with a name", "tools")
        if "input_schema" not in t:  # server tools (web_search, ...) are not ours to run
            continue
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                     "parameters": t.get("input_schema") or {}}})
    tc = get(body, "tool_choice", dict, {}) or {}
    kind = tc.get("type", "auto")
    if kind == "auto":
        choice = "auto"
    elif kind == "any":
        choice = "required"
    elif kind == "none":
        choice = "none"
    elif kind == "tool" and isinstance(tc.get("name"), str):
        choice = {"type": "function", "function": {"name": tc["name"]}}
    else:
        raise bad(f"'tool_choice.type' must be auto, any, tool or none, got {kind!r}", "tool_choice")
    parallel = not tc.get("disable_parallel_tool_use", False)
    return (out or None), (choice, parallel)


def messages_request(body: dict) -> tuple[GenerationRequest, dict]:
    messages = anthropic_messages(body)
    tools, (choice, parallel) = anthropic_tools(body)
    req = GenerationRequest(
        messages=messages, tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
        max_tokens=max_tokens(body, "max_tokens", required=True), sampling=sampling(body),
        stop=stops(body, "stop_sequences"),
        # Anthropic structured outputs: {"type": "json_schema", "schema": {...}}, enforced like OpenAI's
        response_format=get(body, "output_format", dict),
    )
    return req, {"stream": get(body, "stream", bool, False)}
