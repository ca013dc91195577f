"""What a reply may look like, written as an llguidance Lark grammar. Pure Python (no
llguidance, no MLX), so the grammars themselves are easy to read and test.

The grammar covers the generated tokens only (after the prompt and any forced prefix) and
follows the parser's rules (k2mlx/chat/parser.py): K2's markers are special tokens, call ids
are `functions.NAME:IDX` (IDX up to 4 digits, the model's choice), arguments are JSON following
the tool's `parameters` schema. On thinking checkpoints the reasoning before `</think>` is free
text; the mask binds from the first content token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_MARKERS = (SB, SE, CB, AB, CE)
MAX_PARALLEL_CALLS = 8  # calls one constrained reply may hold
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: Any = None  # JSON schema of the arguments (None: any object)
    strict: bool = False  # unsupported schema keywords are an error instead of ignored


@dataclass
class ReplySpec:
    """content: None (free text) or a JSON schema for the answer. tools/choice: the declared
    tools and how a call is required ("auto", "required", or a tool name). forced: the prefix
    the engine already put at the end of the prompt ("", "section" or "call"). reasoning:
    "none" (no thinking tokens), "optional" (the model may open <think>) or "open" (the prompt
    ended inside <think>)."""

    content: Any = None
    content_strict: bool = True
    tools: list[Tool] = field(default_factory=list)
    choice: str = "auto"
    parallel: bool = True
    forced: str = ""
    reasoning: str = "none"


def lit(s: str) -> str:
    """A Lark string literal (JSON escaping is what llguidance's Lark reads)."""
    return json.dumps(s, ensure_ascii=False)


# Unbounded integers are generated within JSON's safe range (what JavaScript and most parsers
# read exactly); a sampled reply cannot then grow digits forever. The output still validates.
SAFE_INT = 2**53 - 1
# Whitespace allowed between JSON tokens: K2 writes `json.dumps` style (`{"a": 1}`) and may
# pretty-print; compact-only JSON pushed k2-nano off its training (0/60 right calls, measured).
WHITESPACE_RUN = 24
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_LITERALS = ("enum", "const", "default", "examples")  # values, not schemas: never rewritten


def bound_integers(schema: Any, depth: int = 0) -> Any:
    """A copy of `schema` where every integer schema lacking a bound gets +-SAFE_INT."""
    if depth > 200:
        raise ValueError("the schema is nested too deeply")
    if isinstance(schema, list):
        return [bound_integers(s, depth + 1) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _LITERALS else bound_integers(v, depth + 1)) for k, v in schema.items()}
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and kind == ["integer"]):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INT
    return out


def json_rule(schema: Any, strict: bool) -> str:
    """`%json {...}` with the options every constrained JSON shares: whitespace as models write
    it (`{"a": 1}`, pretty-printed, or compact) but at most WHITESPACE_RUN characters between two
    tokens of JSON, so a sampled reply cannot pad forever; and, unless strict, keywords llguidance
    cannot enforce ignored rather than refused."""
    if schema is True or schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise TypeError("a JSON schema must be an object")
    schema = bound_integers(schema)
    schema["x-guidance"] = {"whitespace_flexible": True, "whitespace_pattern": f"[\\x20\\x0A\\x0D\\x09]{{0,{WHITESPACE_RUN}}}",
                            "lenient": not strict}
    return "%json " + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _call_rules(spec: ReplySpec, lines: list[str]) -> None:
    for t, tool in enumerate(spec.tools):
        lines.append(f"args_{t}: {json_rule(tool.parameters or ANY_OBJECT, tool.strict)}")
    # the index is the model's: K2 numbers calls across the conversation (`:3` after three earlier
    # calls); forcing the position rewrote k2-nano's `:1` as `:0`
    alts = " | ".join(f"{lit(f'functions.{tool.name}:')} CALL_INDEX {AB} args_{t}" for t, tool in enumerate(spec.tools))
    lines.append(f"call: {CB} ({alts}) {CE}")
    lines.append("CALL_INDEX: /[0-9]{1,4}/")
    n = MAX_PARALLEL_CALLS if spec.parallel else 1
    for i in range(n):
        lines.append(f"calls_{i}: call" + (f" calls_{i + 1}?" if i + 1 < n else ""))
    lines.append(f"section: {SB} calls_0 {SE}")


def to_lark(spec: ReplySpec) -> str:
    lines: list[str] = []
    if spec.forced == "call":  # the engine wrote `SB CB functions.NAME:0 AB`: only the arguments remain
        tool = next(t for t in spec.tools if t.name == spec.choice)  # build_prompt checked it is declared
        lines.append(f"start: {json_rule(tool.parameters or ANY_OBJECT, tool.strict)} {CE} {SE}")
        return "\n".join(lines) + "\n"
    if spec.forced == "section":  # `SB` was forced: one or more declared calls, then the end
        _call_rules(spec, lines)
        lines.insert(0, f"start: calls_0 {SE}")
        return "\n".join(lines) + "\n"
    if spec.content is not None:
        lines.append(f"content: {json_rule(spec.content, spec.content_strict)}")
    else:
        lines.append("content: /(?s:.+)/")
    if spec.tools and spec.choice == "auto":
        _call_rules(spec, lines)
        # text or a call: the section marker stays reachable after (or instead of) the answer
        body = "content? section?" if spec.content is None else "(content | section)"
    else:
        body = "content?" if spec.content is None else "content"
    if spec.reasoning == "open":
        lines.insert(0, f"start: reason? {END_THINK} {body}")
        lines.append("reason: /(?s:.+)/")
    elif spec.reasoning == "optional":
        lines.insert(0, f"start: think? {body}")
        lines.append(f"think: {THINK} reason? {END_THINK}")
        lines.append("reason: /(?s:.+)/")
    else:
        lines.insert(0, f"start: {body}")
    return "\n".join(lines) + "\n"
