"""Turning a request into prompt tokens, and generated tokens into events.

The chat format and the tool-call/reasoning parser live in `k2mlx.chat`; this module only wires
them to the engine: forced tool-call prefixes for tool_choice, bans for tool_choice "none", and
a plain-text parser for raw prompts."""
from __future__ import annotations

from k2mlx.engine.detok import ByteDetokenizer
from k2mlx.events import TextDelta
from k2mlx.engine.request import GenerationRequest
from k2mlx.errors import RequestError

SECTION_BEGIN = "<|tool_calls_section_begin|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"


class RawTextParser:
    """Raw completions: every generated token is text (no tool calls, no reasoning)."""

    def __init__(self, tokenizer):
        self._detok = ByteDetokenizer(tokenizer)

    def feed(self, token: int) -> list:
        text = self._detok.add(token)
        return [TextDelta(text)] if text else []

    def finish(self) -> list:
        text = self._detok.finalize()
        return [TextDelta(text)] if text else []


def _special(tokenizer, name: str) -> int | None:
    return tokenizer.special_tokens.get(name)


def tool_choice_name(choice) -> str | None:
    if isinstance(choice, dict):
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("tool_choice names no function", param="tool_choice")
        return name
    return None


def build_prompt(tokenizer, request: GenerationRequest) -> tuple[list[int], list[int], list[int]]:
    """-> (prompt tokens, forced tokens, banned tokens).

    Forced tokens end the prompt and are fed to the parser before the first generated token, so
    tool_choice "required" or a named function starts the model inside a tool-call section."""
    if request.prompt_tokens is not None:
        return list(request.prompt_tokens), [], []
    if request.prompt is not None:
        return tokenizer.encode(request.prompt, allow_special=False), [], []

    from k2mlx.chat.template import render_tokens
    from k2mlx.chat.volatile import strip_volatile

    tools = request.tools or None
    choice = request.tool_choice
    if not tools:
        if choice == "required" or isinstance(choice, dict):
            raise RequestError(f"tool_choice {choice!r} needs tools, and the request declares none", param="tool_choice")
        choice = "none"
    # per-request noise (billing lines) would defeat the prefix cache: see k2mlx/chat/volatile.py
    tokens = list(render_tokens(tokenizer, strip_volatile(request.messages), tools=tools, add_generation_prompt=True,
                                **request.chat_kwargs))
    forced: list[int] = []
    banned: list[int] = []
    begin = _special(tokenizer, SECTION_BEGIN)
    if choice == "none" or not tools:
        if begin is not None and request.parse:
            banned.append(begin)
    elif choice == "required" or isinstance(choice, dict):
        name = tool_choice_name(choice)
        if name is not None and name not in {_tool_name(t) for t in tools}:
            raise RequestError(f"tool_choice names '{name}', which is not among the tools", param="tool_choice")
        forced.append(begin)
        if name is not None:
            forced.append(_special(tokenizer, CALL_BEGIN))
            forced += tokenizer.encode(f"functions.{name}:0", allow_special=False)
            forced.append(_special(tokenizer, ARG_BEGIN))
        if None in forced:
            raise RequestError("this tokenizer has no tool-call tokens", param="tool_choice")
    elif choice != "auto":
        raise RequestError(f"tool_choice must be auto, none, required or a function, got {choice!r}",
                           param="tool_choice")
    return tokens + forced, forced, banned


def _tool_name(tool: dict) -> str | None:
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return fn.get("name") if isinstance(fn, dict) else None


def make_parser(tokenizer, request: GenerationRequest, prompt: list[int], forced: list[int]):
    if not request.parse or request.messages is None:
        return RawTextParser(tokenizer)
    from k2mlx.chat.parser import StreamParser
    from k2mlx.chat.template import prompt_opens_reasoning

    rendered = prompt[: len(prompt) - len(forced)]
    # the declared tools: calls to others become text; nameless ids map by their arguments
    tools = [t for t in request.tools or () if isinstance(_tool_name(t), str)]
    return StreamParser(tokenizer, start_in_reasoning=prompt_opens_reasoning(tokenizer, rendered), tools=tools)
