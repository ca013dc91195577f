"""Lines that clients change on every request although they mean nothing to the model.

A prefix cache only helps while the start of the prompt stays the same. Claude-Code-style
clients put a billing line at the top of the system prompt whose `cch=` value changes on every
request (`x-anthropic-billing-header: cc_version=2.1.100.7b4; cc_entrypoint=cli; cch=eb6c6;`), so
every turn would miss at token ~40 and prefill the whole 20-60K-token prompt again. Such lines
are removed from system messages before the prompt is rendered; nothing else is touched (not
user or tool content, and not dates, which the model may need).

Normalized today (each a whole line of a system message, anchored at its start):
- `x-anthropic-billing-header: …` (Claude Code >= 2.1)
"""
from __future__ import annotations

import re

VOLATILE_LINES = (re.compile(r"^x-anthropic-billing-header:[^\n]*(?:\n|$)", re.MULTILINE),)


def _strip(text: str) -> str:
    for pattern in VOLATILE_LINES:
        text = pattern.sub("", text)
    return text


def strip_volatile(messages: list | None) -> list | None:
    """The messages with volatile lines removed from system messages (a new list when anything
    changed; the input is never modified). A text block left empty is dropped."""
    if not messages:
        return messages
    out, changed = [], False
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "system":
            content = m.get("content")
            if isinstance(content, str):
                new = _strip(content)
                if new != content:
                    m, changed = {**m, "content": new}, True
            elif isinstance(content, list):
                blocks, touched = [], False
                for b in content:
                    if isinstance(b, dict) and isinstance(b.get("text"), str):
                        text = _strip(b["text"])
                        if text != b["text"]:
                            touched = True
                            if not text.strip():
                                continue
                            b = {**b, "text": text}
                    blocks.append(b)
                if touched:
                    m, changed = {**m, "content": blocks}, True
        out.append(m)
    return out if changed else messages
