"""Volatile system-prompt lines (k2mlx/chat/volatile.py) do not change the rendered prompt, so a
Claude-Code-style client's turns share their prefix; other content is left exactly as sent."""
from __future__ import annotations

from k2mlx.chat.volatile import strip_volatile
from k2mlx.engine.prompting import build_prompt
from k2mlx.engine.request import GenerationRequest

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]


def billing(cch: str) -> str:
    return f"x-anthropic-billing-header: cc_version=2.1.100.7b4; cc_entrypoint=cli; cch={cch};"


def tokens(tok, messages):
    return build_prompt(tok, GenerationRequest(messages=messages, tools=TOOLS))[0]


def test_billing_line_changes_nothing_in_the_prompt(tiny_tokenizer):
    plain = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "hi"}]
    for cch in ("eb6c6", "0aaa9"):
        as_string = [{"role": "system", "content": billing(cch) + "\nYou are a coding agent."}, plain[1]]
        as_blocks = [{"role": "system", "content": [{"type": "text", "text": billing(cch)},
                                                   {"type": "text", "text": "You are a coding agent."}]}, plain[1]]
        assert tokens(tiny_tokenizer, as_string) == tokens(tiny_tokenizer, plain)
        assert strip_volatile(as_blocks)[0]["content"] == [{"type": "text", "text": "You are a coding agent."}]


def test_other_content_is_untouched_and_inputs_are_not_modified():
    msgs = [{"role": "user", "content": billing("abcde")},                       # user text is the user's
            {"role": "system", "content": "see x-anthropic-billing-header: in the docs"}]  # not at line start
    assert strip_volatile(msgs) is msgs
    sys_msg = {"role": "system", "content": billing("abcde") + "\nrules"}
    out = strip_volatile([sys_msg])
    assert out[0]["content"] == "rules" and sys_msg["content"].startswith("x-anthropic")
