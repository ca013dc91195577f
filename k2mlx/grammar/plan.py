"""Deciding, per request, whether and how decoding is constrained; runs on the caller side
(`Engine.prepare`), so bad schemas are 400s before anything reaches the model thread.

Constrained:
- `response_format` json_schema / json_object (OpenAI; Anthropic's `output_format` arrives the
  same way): the answer is JSON following the schema, from its first content token;
- tool_choice "required" or a named tool: a call to a declared tool whose arguments follow
  that tool's `parameters` schema;
- tool_choice "auto" when a declared tool says `strict: true`, or with `AUTO_TOOLS` on: text or a
  schema-valid call to a declared tool (the section marker stays reachable).
Everything else decodes free, with no grammar cost at all."""
from __future__ import annotations

import logging
import os

from k2mlx.errors import RequestError
from k2mlx.grammar.spec import END_THINK, THINK, TOOL_MARKERS, ReplySpec, Tool, to_lark

# Constrain tool calls under tool_choice "auto" too (see docs/BENCHMARKS.md for its cost).
# K2MLX_CONSTRAIN_AUTO_TOOLS=0 switches it off for the process; read once at import.
AUTO_TOOLS = os.environ.get("K2MLX_CONSTRAIN_AUTO_TOOLS", "1") != "0"
log = logging.getLogger("k2mlx.grammar")
_warned_missing = False


def parse_response_format(rf) -> tuple[object, bool] | None:
    """OpenAI `response_format` (or Anthropic `output_format`) -> (schema, strict), or None for
    plain text. json_object is any JSON object."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise RequestError("'response_format' must be an object", param="response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}, True
    if kind != "json_schema":
        raise RequestError(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
                           param="response_format")
    inner = rf.get("json_schema", rf)  # OpenAI nests it; Anthropic's output_format does not
    if not isinstance(inner, dict):
        raise RequestError("'response_format.json_schema' must be an object", param="response_format")
    schema = inner.get("schema", {})
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise RequestError("'response_format.json_schema.schema' must be a JSON schema object",
                           param="response_format")
    strict = inner.get("strict", True)  # an explicit false relaxes unsupported keywords only
    return schema, strict is not False


def _tools(tools) -> list[Tool]:
    out = []
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"tool {fn['name']!r}: 'parameters' must be a JSON schema object", param="tools")
        out.append(Tool(fn["name"], params, fn.get("strict") is True))
    return out


def reply_spec(tokenizer, request, prompt: list[int], forced: list[int]) -> ReplySpec | None:
    """The shape the reply must take, or None when it is free."""
    if not request.parse or request.messages is None:
        return None
    content = parse_response_format(getattr(request, "response_format", None))
    tools = _tools(request.tools)
    choice = request.tool_choice
    sp = tokenizer.special_tokens
    if not tools or choice == "none" or not all(m in sp for m in TOOL_MARKERS):
        tools, choice = [], "none"  # (a tokenizer without K2's markers cannot call tools at all)
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        named = fn.get("name")
    # under auto with a JSON answer the reply is JSON or a call, so the calls are held to their schemas too
    auto = choice == "auto" and (AUTO_TOOLS or content is not None or any(t.strict for t in tools))
    constrain_tools = bool(tools) and (choice == "required" or named is not None or auto)
    if content is None and not constrain_tools:
        return None
    spec = ReplySpec(parallel=bool(request.parallel_tool_calls))
    if content is not None:
        spec.content, spec.content_strict = content
    if constrain_tools:
        spec.tools = tools
        spec.choice = named if named is not None else choice
        spec.forced = "call" if named is not None else ("section" if choice == "required" else "")
    if not forced and THINK in sp and END_THINK in sp:
        rendered = prompt[: len(prompt) - len(forced)]
        spec.reasoning = "open" if rendered and rendered[-1] == sp[THINK] else "optional"
    return spec


def constraint_for(tokenizer, request, prompt: list[int], forced: list[int]):
    """A fresh per-sequence logits processor for this request, or None. Raises RequestError
    (400) for a schema that cannot be enforced, or takes too long to compile."""
    spec = reply_spec(tokenizer, request, prompt, forced)
    if spec is None:
        return None
    try:
        from k2mlx.grammar.compile import compile_grammar
        from k2mlx.grammar.processor import GrammarProcessor
        import llguidance  # noqa: F401
    except ImportError as e:
        if spec.content is None and spec.choice == "auto" and not any(t.strict for t in spec.tools):
            global _warned_missing
            if not _warned_missing:
                _warned_missing = True
                log.warning("llguidance is not installed: tool calls under auto are not constrained (%s)", e)
            return None  # the default path keeps working; what the client asked for explicitly does not
        raise RequestError("constrained decoding needs the llguidance package (pip install llguidance)",
                           param="response_format" if spec.content is not None else "tool_choice") from e
    param = "response_format" if spec.content is not None and not spec.tools else "tools"
    try:
        lark = to_lark(spec)
    except (TypeError, ValueError, RecursionError) as e:  # a schema json cannot serialise
        raise RequestError(f"the schema cannot be used: {e}", param=param) from e
    try:
        proto = compile_grammar(tokenizer, lark, param)
    except RequestError as e:
        if spec.tools:
            _blame(tokenizer, spec, e)
        raise
    return GrammarProcessor(proto.deep_copy(), tokenizer.vocab_size, tokenizer.eos_token_ids)


def _blame(tokenizer, spec: ReplySpec, error: RequestError) -> None:
    """On a refused grammar with tools, compile the answer's schema and each tool's alone to name
    the one at fault."""
    from k2mlx.grammar.compile import compile_grammar
    from k2mlx.grammar.spec import json_rule

    parts = [("response_format", "response_format", spec.content, spec.content_strict)] if spec.content is not None else []
    parts += [("tools", f"tools[{i}] ({t.name})", t.parameters or {"type": "object"}, t.strict)
              for i, t in enumerate(spec.tools)]
    for param, where, schema, strict in parts:
        try:
            compile_grammar(tokenizer, f"start: {json_rule(schema, strict)}\n", param)
        except RequestError as e:
            raise RequestError(f"{where}: {e}", param=param) from error
