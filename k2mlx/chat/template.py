"""Render OpenAI-style conversations to the text (and tokens) Kimi K2 expects.

Two renderers that give the same text:
- the checkpoint's own `chat_template.jinja` (or `chat_template` in tokenizer_config.json), run
  in a sandboxed jinja2 environment set up like transformers' `apply_chat_template`
  (trim_blocks, lstrip_blocks, loop controls, a `tojson` that takes `separators`);
- a built-in K2 formatter, used when a checkpoint ships no template. It follows Moonshot's
  K2-Instruct template, or K2-Thinking's when the tokenizer has `<think>`; tests check both
  against the real templates token for token.

K2's format, in short: a turn is `<|im_{user,assistant,system}|>{name or role}<|im_middle|>
{content}<|im_end|>`; tools are declared first in a `tool_declare` system turn as compact JSON;
assistant tool calls follow the content as `<|tool_calls_section_begin|>` then per call
`<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>`, then
`<|tool_calls_section_end|>`; a tool result is a system-class turn named after the tool whose
content starts with `## Return of {tool_call_id}\n`. Native call ids are `functions.NAME:IDX`.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Sequence

from k2mlx.errors import RequestError

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")
NATIVE_ID = re.compile(r"^functions\.([A-Za-z0-9_\-.]+):(\d+)$")


# ---- message normalisation (shared by both renderers, so they see the same input) ------------
def _text_of(content: Any, where: str) -> str | None:
    """OpenAI content (str, None or a list of parts) -> str or None. Images are refused: K2 is a
    text model, and silently dropping one would answer a different question."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string, null or a list of parts", param="messages")
    out = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, dict):
            raise RequestError(f"{where}.content[{j}] must be an object", param="messages")
        kind = part.get("type", "text")
        if kind in ("text", "input_text", "output_text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise RequestError(f"{where}.content[{j}].text must be a string", param="messages")
            out.append(text)
        elif kind in ("image", "image_url", "input_image", "input_audio", "file"):
            raise RequestError(f"{where}.content[{j}]: this model takes text only, not {kind}", param="messages")
        else:
            raise RequestError(f"{where}.content[{j}] has unknown type {kind!r}", param="messages")
    return "".join(out)


def normalize_messages(messages: Sequence[dict], native_ids: bool = True) -> list[dict]:
    """Validate OpenAI-style messages and bring them to the one shape both renderers take.

    Drops null fields (as transformers does), maps `developer` to `system`, flattens content
    parts, gives tool calls and tool results ids when missing, and with `native_ids` rewrites
    foreign call ids (`call_abc`, `toolu_...`) to K2's own `functions.NAME:IDX`, consistently in
    the calls and the results that answer them: K2 was trained on its own ids only.
    Raises `RequestError` naming the bad message."""
    if not isinstance(messages, (list, tuple)):
        raise RequestError("messages must be a list", param="messages")
    out: list[dict] = []
    rename: dict[str, str] = {}
    pending: list[str] = []  # ids of the latest calls not yet answered, in order
    # native ids the client already uses anywhere: an id we write must not repeat one of them
    used: set[str] = {c["id"] for m in messages if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
                      for c in m["tool_calls"] if isinstance(c, dict) and isinstance(c.get("id"), str)
                      and NATIVE_ID.match(c["id"])}
    n_calls = 0  # calls so far in the conversation; an id we write counts globally, as K2's do
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        m = dict(m)
        if role == "function":  # OpenAI's legacy function result
            role = "tool"
        if m.get("function_call") and not m.get("tool_calls"):  # legacy single call
            m["tool_calls"] = [{"type": "function", "function": m["function_call"]}]
        m.pop("function_call", None)
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param="messages")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = role
        if "content" in msg:
            msg["content"] = _text_of(msg["content"], where)
        name = msg.get("name")
        if name is not None and not isinstance(name, str):
            raise RequestError(f"{where}.name must be a string", param="messages")
        if role == "assistant" and msg.get("tool_calls"):
            calls = msg["tool_calls"]
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", param="messages")
            new_calls, pending = [], []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise RequestError(f"{where}.tool_calls[{j}].function.name is missing", param="messages")
                args = fn.get("arguments", "{}")
                if args is None:
                    args = "{}"
                if not isinstance(args, (str, dict, list)):
                    raise RequestError(f"{where}.tool_calls[{j}].function.arguments must be a string", param="messages")
                cid = call.get("id")
                if cid is not None and not isinstance(cid, str):
                    raise RequestError(f"{where}.tool_calls[{j}].id must be a string", param="messages")
                if isinstance(args, str):
                    args = _unwrap_encoded(args)
                if not cid or (native_ids and not NATIVE_ID.match(cid)):
                    k = n_calls
                    native = f"functions.{fn['name']}:{k}"
                    while native in used:
                        k += 1
                        native = f"functions.{fn['name']}:{k}"
                    if cid:
                        rename[cid] = native
                    cid = native
                used.add(cid)
                n_calls += 1
                pending.append(cid)
                new_calls.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
            msg["tool_calls"] = new_calls
        elif role == "assistant":
            msg.pop("tool_calls", None)
        if role == "tool":
            cid = msg.get("tool_call_id")
            if cid is not None and not isinstance(cid, str):
                raise RequestError(f"{where}.tool_call_id must be a string", param="messages")
            if not cid:  # answer the oldest unanswered call
                cid = pending[0] if pending else f"functions.{name or 'unknown'}:0"
            cid = rename.get(cid, cid)
            if cid in pending:
                pending.remove(cid)
            msg["tool_call_id"] = cid
        rc = msg.get("reasoning_content", msg.get("reasoning"))
        if rc is not None:
            if not isinstance(rc, str):
                raise RequestError(f"{where}.reasoning_content must be a string", param="messages")
            msg["reasoning_content"] = rc
        out.append(msg)
    return out


def _unwrap_encoded(args: str) -> str:
    """Arguments some clients send JSON-encoded twice (`"{\\"a\\": 1}"`) -> the JSON inside, so
    the model sees the form it was trained on. Anything else is left exactly as given."""
    if not args.startswith('"'):
        return args
    try:
        inner = json.loads(args)
        if isinstance(inner, str) and isinstance(json.loads(inner), (dict, list)):
            return inner
    except ValueError:
        pass  # not double-encoded: the arguments stay as the client wrote them
    return args


def normalize_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise RequestError("tools must be a list", param="tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}] must be an object", param="tools")
        fn = t.get("function", t if "name" in t else None)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}].function.name is missing", param="tools")
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out or None


# ---- the built-in K2 formatter ----------------------------------------------------------------
def _tojson(x: Any, separators=None) -> str:
    return json.dumps(x, ensure_ascii=False, separators=separators)


def _header(m: dict) -> str:
    tag = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(m["role"], "<|im_system|>")
    return f"{tag}{m.get('name') or m['role']}<|im_middle|>"


def _calls(m: dict) -> str:
    parts = ["<|tool_calls_section_begin|>"]
    for c in m["tool_calls"]:
        args = c["function"]["arguments"]
        args = args if isinstance(args, str) else _tojson(args)
        parts.append(f"<|tool_call_begin|>{c['id']}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
    parts.append("<|tool_calls_section_end|>")
    return "".join(parts)


def _body(m: dict, think: str | None) -> str:
    """One turn's content. `think` is None for K2-Instruct, else the text inside <think></think>."""
    content = m.get("content") or ""
    if m["role"] == "assistant":
        pre = "" if think is None else f"<think>{think}</think>"
        return pre + content + (_calls(m) if m.get("tool_calls") else "")
    if m["role"] == "tool":
        return f"## Return of {m['tool_call_id']}\n{content}"
    return content


def builtin_render(messages: Sequence[dict], tools: list | None = None, add_generation_prompt: bool = True,
                   thinking: bool = False) -> str:
    """K2-Instruct's (or with `thinking`, K2-Thinking's) chat template, in Python.
    Takes normalized messages (see `normalize_messages`)."""
    out = []
    if tools:
        out.append(f"<|im_system|>tool_declare<|im_middle|>{_tojson(tools, (',', ':'))}<|im_end|>")
    if not thinking:
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system":
                # K2-Instruct's template leaves a newline after its default system turn
                out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>\n")
            out.append(_header(m) + _body(m, None) + "<|im_end|>")
    else:
        if not messages or messages[0]["role"] != "system":
            out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>")
        # reasoning is kept only after the last assistant turn that made no tool call
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
                   default=-1)
        for i, m in enumerate(messages):
            think = "" if i <= last else m.get("reasoning_content", "")
            out.append(_header(m) + _body(m, think) + "<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(out)


# ---- jinja ------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # HF's filter: no HTML escaping, accepts separators (K2 declares tools with compact JSON)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def jinja_render(template: str, messages: Sequence[dict], tools: list | None = None,
                 add_generation_prompt: bool = True, **kwargs) -> str:
    """Render with a chat template (already-normalized messages)."""
    import jinja2

    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise RequestError(f"the model's chat template does not compile: {e}", param="messages") from e
    try:
        return compiled.render(messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                               **kwargs)
    except jinja2.TemplateError as e:  # raise_exception() in a template is about the input
        raise RequestError(f"the chat template rejected this conversation: {e}", param="messages") from e
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        raise RequestError(f"the chat template failed on this conversation: {e}", param="messages") from e


# ---- public API -------------------------------------------------------------------------------
def render(messages: Sequence[dict], tools: list | None = None, add_generation_prompt: bool = True,
           template: str | None = None, thinking: bool | None = None, native_ids: bool = True, **kwargs) -> str:
    """Conversation -> prompt text. With `template` (a chat template's text) renders with it,
    else with the built-in K2 format (`thinking` picks K2-Thinking's). Extra keyword arguments
    (and `thinking`, when given) reach the template as variables (chat_template_kwargs)."""
    msgs = normalize_messages(messages, native_ids=native_ids)
    tools = normalize_tools(tools)
    if template:
        if thinking is not None:
            kwargs["thinking"] = thinking
        return jinja_render(template, msgs, tools, add_generation_prompt, **kwargs)
    return builtin_render(msgs, tools, add_generation_prompt, thinking=bool(thinking))


def is_thinking(tokenizer) -> bool:
    """A K2-Thinking-style checkpoint: `<think>` is a named token."""
    return "<think>" in getattr(tokenizer, "special_tokens", {})


def render_text(tokenizer, messages: Sequence[dict], tools: list | None = None, add_generation_prompt: bool = True,
                use_template: bool = True, **kwargs) -> str:
    """Render with the tokenizer's chat template when it has one, else the built-in format (K2-Thinking's
    when the tokenizer names `<think>`; a `thinking` keyword then does not change the format)."""
    template = getattr(tokenizer, "chat_template", None) if use_template else None
    if not template:
        kwargs["thinking"] = is_thinking(tokenizer)
    return render(messages, tools=tools, add_generation_prompt=add_generation_prompt, template=template, **kwargs)


# Private-use characters that fence special-token text found in user-supplied strings, so that
# after rendering it can be told apart from the markers the template writes itself.
_FENCE_OPEN, _FENCE_CLOSE = "\ue000", "\ue001"
_FENCED = re.compile(f"{_FENCE_OPEN}(.*?){_FENCE_CLOSE}|[{_FENCE_OPEN}{_FENCE_CLOSE}]", re.S)


@lru_cache(maxsize=8)
def _special_pattern(names: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))) or "(?!)")


def _fence(obj: Any, pattern: re.Pattern) -> Any:
    if isinstance(obj, str):
        obj = obj.replace(_FENCE_OPEN, "").replace(_FENCE_CLOSE, "")  # no forged fences
        return pattern.sub(lambda m: _FENCE_OPEN + m.group(0) + _FENCE_CLOSE, obj)
    if isinstance(obj, dict):
        return {k: _fence(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fence(v, pattern) for v in obj]
    return obj


def render_tokens(tokenizer, messages: Sequence[dict], tools: list | None = None, add_generation_prompt: bool = True,
                  use_template: bool = True, sanitize: bool = True, **kwargs) -> list[int]:
    """Conversation -> prompt token ids; the markers the format writes become special tokens.

    With `sanitize` (the default), special-token text inside the conversation itself (a user
    pasting `<|im_end|>`, a file read by a tool) is encoded as plain text, so it cannot end a turn
    or forge a tool call (transformers' `sanitize_control_tokens`). Without it, every marker text
    becomes a special token, exactly as `apply_chat_template(tokenize=True)` does by default;
    both give the same tokens when the conversation holds no marker text."""
    if not sanitize:
        text = render_text(tokenizer, messages, tools, add_generation_prompt, use_template, **kwargs)
        return tokenizer.encode(text, allow_special=True)
    pattern = _special_pattern(tuple(tokenizer.special_tokens))
    messages, tools = _fence(list(messages), pattern), _fence(tools, pattern)
    text = render_text(tokenizer, messages, tools, add_generation_prompt, use_template, **kwargs)
    ids: list[int] = []
    pos = 0
    for m in _FENCED.finditer(text):
        ids += tokenizer.encode(text[pos : m.start()], allow_special=True)
        if m.group(1):
            ids += tokenizer.encode(m.group(1), allow_special=False)
        pos = m.end()
    ids += tokenizer.encode(text[pos:], allow_special=True)
    return ids


def prompt_opens_reasoning(tokenizer, prompt_tokens: Sequence[int]) -> bool:
    """True when the prompt itself ends inside `<think>` (K2.5-style generation prompts), so the
    output parser must start in reasoning mode."""
    think = getattr(tokenizer, "special_tokens", {}).get("<think>")
    return bool(prompt_tokens) and think is not None and prompt_tokens[-1] == think
