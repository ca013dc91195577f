"""Checks on a parsed request body that must run before anything recursive or costly sees it.

One iterative walk (an explicit stack, so no input can exhaust Python's recursion) that
- refuses nesting deeper than `MAX_DEPTH`, naming the path of the first too-deep value: the chat
  template fences and renders tool schemas and call arguments recursively, and 500 levels of
  nesting used to end in a RecursionError (a 500);
- replaces lone surrogates (`"\\udc80"`, legal in JSON text but not in Unicode) with U+FFFD in
  every string and key, so no later encode (tokenizer, response body) can fail on them; clients
  that cut a JavaScript string mid-pair send these, so they are repaired rather than refused;
- sums the UTF-8 size of the strings that become the prompt, so a prompt that cannot fit the
  context is refused before it is tokenized (tokenizing 30 M characters took 6.8 s and 616 MB).
"""
from __future__ import annotations

import json
import re

from k2mlx.server.errors import HTTPError

MAX_DEPTH = 64  # JSON nesting levels, the body itself counting as 1 (real tool schemas use < 20)
# Fields whose strings end up in the prompt (the chat template renders messages, tools, system).
PROMPT_FIELDS = ("messages", "tools", "system", "prompt", "suffix", "response_format")
# A prompt longer than the context times this many bytes cannot fit: every token covers at most
# the tokenizer's longest token, capped here because natural text averages 3-5 bytes a token.
MAX_BYTES_PER_TOKEN = 32

_SURROGATE = re.compile("[\ud800-\udfff]")


def prompt_byte_limit(context_length: int, tokenizer=None) -> int:
    """Bytes of prompt text beyond which a request is refused without tokenizing it."""
    longest = MAX_BYTES_PER_TOKEN
    to_bytes = getattr(tokenizer, "id_to_bytes", None)
    n = getattr(tokenizer, "num_base_tokens", 0)
    if to_bytes is not None and n:
        try:
            longest = min(longest, max(len(to_bytes(i)) for i in range(n)))
        except (KeyError, IndexError, ValueError, TypeError):
            longest = MAX_BYTES_PER_TOKEN  # a tokenizer without the method's contract: keep the cap
    return max(1, context_length) * max(longest, 4)


def _fix(s: str) -> str:
    return _SURROGATE.sub("\ufffd", s) if _SURROGATE.search(s) else s


def _where(path) -> str:
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    out = ""
    for k in reversed(keys):
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return (out if len(out) <= 120 else out[:80] + "..." + out[-30:]) or "body"


def _top(path) -> str:
    key = "body"
    while path is not None:
        path, key = path
    return str(key)


_TOKENS = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:)?|[\[\]{},]')


def deep_path(raw: bytes, max_depth: int = MAX_DEPTH) -> str | None:
    """Where raw JSON text first nests deeper than `max_depth` (for bodies too deep for json.loads,
    which gives up with a RecursionError past ~900 levels): a flat scan, no recursion."""
    stack: list[list] = []  # per open container: [b"{" or b"[", current key or index]
    for m in _TOKENS.finditer(raw):
        c = m.group(0)[:1]
        if c == b'"':
            if m.group(2) and stack and stack[-1][0] == b"{":
                try:
                    stack[-1][1] = json.loads(b'"' + m.group(1) + b'"')
                except ValueError:
                    stack[-1][1] = "?"
        elif c in (b"{", b"["):
            stack.append([c, 0 if c == b"[" else "?"])
            if len(stack) > max_depth:
                path = None
                for _, key in stack[:-1]:
                    path = (path, key)
                return _where(path)
        elif c in (b"}", b"]"):
            if stack:
                stack.pop()
        elif stack and stack[-1][0] == b"[":  # a comma in a list
            stack[-1][1] += 1
    return None


def check_body(body: dict, max_depth: int = MAX_DEPTH) -> tuple[dict, int]:
    """-> (body with lone surrogates replaced, UTF-8 bytes of the prompt fields' strings).
    Raises HTTPError(400) naming the first value nested deeper than `max_depth`."""
    prompt_bytes = 0
    root: list = [body]
    # (container holding the value, its key there, depth of the value, path as (parent, key) links,
    # whether its strings count toward the prompt); only containers and strings are pushed
    stack = [(root, 0, 1, None, False)]
    while stack:
        parent, key, depth, path, counted = stack.pop()
        v = parent[key]
        if isinstance(v, str):
            v = parent[key] = _fix(v)
            if counted:
                prompt_bytes += len(v) if v.isascii() else len(v.encode("utf-8"))
            continue
        if depth > max_depth:
            raise HTTPError(400, f"{_where(path)} is nested more than {max_depth} levels deep",
                            code="nesting_too_deep", param=_top(path))
        if isinstance(v, dict):
            new: dict | list = {}
            for k, item in v.items():
                if isinstance(k, str):
                    k = _fix(k)
                    if counted:
                        prompt_bytes += len(k) if k.isascii() else len(k.encode("utf-8"))
                new[k] = item
                if isinstance(item, (str, dict, list)):
                    stack.append((new, k, depth + 1, (path, k), counted or (depth == 1 and k in PROMPT_FIELDS)))
        else:
            new = list(v)
            for i, item in enumerate(new):
                if isinstance(item, (str, dict, list)):
                    stack.append((new, i, depth + 1, (path, i), counted))
        parent[key] = new
    return root[0], prompt_bytes
