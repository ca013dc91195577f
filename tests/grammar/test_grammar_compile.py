"""Grammars for constrained decoding: what they accept (llguidance's matcher driven with real
token ids of the tiny K2 tokenizers), bad schemas refused with the keyword named, the cache and
the compile timeout."""
from __future__ import annotations

import json
import time

import pytest

from k2mlx.errors import RequestError
from k2mlx.grammar import compile as gc
from k2mlx.grammar.plan import parse_response_format, reply_spec
from k2mlx.grammar.spec import SAFE_INT, WHITESPACE_RUN, ReplySpec, Tool, bound_integers, json_rule, to_lark

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
WEATHER = Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False})
ADD = Tool("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}, strict=True)


@pytest.fixture(scope="module")
def think_tok(tiny_thinking_checkpoint):
    from k2mlx.tokenizer import load_tokenizer

    return load_tokenizer(tiny_thinking_checkpoint)


def accepts(tok, spec_or_lark, text: str) -> bool:
    """Whether the grammar takes exactly `text` (specials as their ids) and may end there."""
    lark = spec_or_lark if isinstance(spec_or_lark, str) else to_lark(spec_or_lark)
    m = gc.compile_grammar(tok, lark, "test").deep_copy()
    ids = tok.encode(text)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def test_json_schema_grammar(tiny_tokenizer):
    spec = ReplySpec(content={"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5},
                                                               "tag": {"enum": ["a", "b"]}},
                              "required": ["n", "tag"], "additionalProperties": False})
    for good in ('{"n":3,"tag":"b"}', '{"n": 3, "tag": "b"}', '{\n  "n": 3,\n  "tag": "b"\n}'):
        assert accepts(tiny_tokenizer, spec, good), good
    for bad in ('{"n":9,"tag":"b"}', '{"n":3}', '{"n":3,"tag":"c"}', '{"n":3,"tag":"b","x":1}', 'hi {"n":3,"tag":"b"}',
                '{"n":' + " " * (WHITESPACE_RUN + 1) + '3,"tag":"b"}'):  # whitespace is bounded: no padding forever
        assert not accepts(tiny_tokenizer, spec, bad), bad


def test_tool_section_grammars(tiny_tokenizer):
    required = ReplySpec(tools=[WEATHER, ADD], choice="required", forced="section")
    assert accepts(tiny_tokenizer, required, f'{CB}functions.add:0{AB}{{"a":1,"b":2}}{CE}{SE}')
    assert accepts(tiny_tokenizer, required, f'{CB}functions.add:0{AB}{{"a":1,"b":2}}{CE}'
                                             f'{CB}functions.get_weather:1{AB}{{"city":"x"}}{CE}{SE}')
    assert not accepts(tiny_tokenizer, required, f'{CB}functions.rm:0{AB}{{}}{CE}{SE}')  # undeclared
    assert not accepts(tiny_tokenizer, required, f'{CB}functions.add:0{AB}{{"a":1}}{CE}{SE}')  # schema
    assert not accepts(tiny_tokenizer, required, f'{SE}')  # "required": at least one call
    # the index is the model's own (K2 counts calls across the conversation), up to 4 digits
    assert accepts(tiny_tokenizer, required, f'{CB}functions.add:3{AB}{{"a":1,"b":2}}{CE}{SE}')
    assert not accepts(tiny_tokenizer, required, f'{CB}functions.add:12345{AB}{{"a":1,"b":2}}{CE}{SE}')
    assert not accepts(tiny_tokenizer, required, f'{CB}functions.add{AB}{{"a":1,"b":2}}{CE}{SE}')
    single = ReplySpec(tools=[WEATHER, ADD], choice="required", forced="section", parallel=False)
    assert not accepts(tiny_tokenizer, single, f'{CB}functions.add:0{AB}{{"a":1,"b":2}}{CE}'
                                               f'{CB}functions.add:1{AB}{{"a":1,"b":2}}{CE}{SE}')
    named = ReplySpec(tools=[WEATHER, ADD], choice="get_weather", forced="call")
    assert accepts(tiny_tokenizer, named, f'{{"city":"Rome"}}{CE}{SE}')
    assert not accepts(tiny_tokenizer, named, f'{{"a":1,"b":2}}{CE}{SE}')
    auto = ReplySpec(tools=[WEATHER, ADD], choice="auto")
    assert accepts(tiny_tokenizer, auto, "just text, no call")
    assert accepts(tiny_tokenizer, auto, f'Let me check.{SB}{CB}functions.get_weather:0{AB}{{"city":"x"}}{CE}{SE}')
    assert not accepts(tiny_tokenizer, auto, f'{SB}{CB}functions.nope:0{AB}{{}}{CE}{SE}')
    json_or_call = ReplySpec(content={"type": "integer"}, tools=[ADD], choice="auto")
    assert accepts(tiny_tokenizer, json_or_call, "42")
    assert accepts(tiny_tokenizer, json_or_call, f'{SB}{CB}functions.add:0{AB}{{"a":1,"b":2}}{CE}{SE}')
    assert not accepts(tiny_tokenizer, json_or_call, "forty-two")


def test_reasoning_is_free_and_the_answer_constrained(think_tok):
    spec = ReplySpec(content={"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, reasoning="optional")
    assert accepts(think_tok, spec, "<think>free {text} 你好 [not json</think>[true,false]")
    assert accepts(think_tok, spec, "[true]")  # no reasoning at all: constrained from the first token
    assert not accepts(think_tok, spec, "<think>x</think>[true,false,true]")
    assert not accepts(think_tok, spec, "x<think>y</think>[true]")
    spec.reasoning = "open"  # the prompt already opened <think>
    assert accepts(think_tok, spec, "still thinking</think>[]")


def test_integers_without_bounds_get_the_safe_range():
    s = {"type": "object", "properties": {"n": {"type": "integer"}, "m": {"type": "integer", "minimum": 3},
                                          "k": {"const": {"type": "integer"}}, "e": {"enum": [{"type": "integer"}]}}}
    b = bound_integers(s)
    assert b["properties"]["n"] == {"type": "integer", "minimum": -SAFE_INT, "maximum": SAFE_INT}
    assert b["properties"]["m"] == {"type": "integer", "minimum": 3, "maximum": SAFE_INT}
    assert b["properties"]["k"] == s["properties"]["k"] and b["properties"]["e"] == s["properties"]["e"]
    assert s["properties"]["n"] == {"type": "integer"}  # the caller's schema is not changed


def test_response_format_shapes():
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ({"type": "object"}, True)
    schema = {"type": "integer"}
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == (schema, True)
    assert parse_response_format({"type": "json_schema", "json_schema": {"schema": schema, "strict": False}}) == (schema, False)
    assert parse_response_format({"type": "json_schema", "schema": schema}) == (schema, True)  # Anthropic's shape
    for bad in ({"type": "xml"}, {"type": "json_schema", "json_schema": 3}, {"type": "json_schema", "schema": [1]}, "json"):
        with pytest.raises(RequestError) as e:
            parse_response_format(bad)
        assert e.value.param == "response_format"


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
])
def test_unsupported_keywords_are_a_400_naming_them(tiny_tokenizer, schema, keyword):
    with pytest.raises(RequestError) as e:
        gc.compile_grammar(tiny_tokenizer, f"start: {json_rule(schema, True)}\n", "response_format")
    assert e.value.param == "response_format" and keyword in str(e.value) and "cannot enforce" in str(e.value)
    # not strict: the keyword is ignored (logged), everything else still enforced
    assert accepts(tiny_tokenizer, f"start: {json_rule(schema, False)}\n", json.dumps(
        [1, 1] if "items" in schema else ({"a": 1} if "properties" in schema else "abcdef")))


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"$ref": "#/$defs/missing"}, {"type": "string", "pattern": "(a"},
                                    {"allOf": [{"type": "string"}, {"type": "integer"}]}])
def test_invalid_schemas_are_a_400(tiny_tokenizer, schema):
    with pytest.raises(RequestError) as e:
        gc.compile_grammar(tiny_tokenizer, f"start: {json_rule(schema, True)}\n", "response_format")
    assert "cannot be enforced" in str(e.value)


def test_tool_schema_errors_name_the_tool(tiny_tokenizer):
    from k2mlx.engine.request import GenerationRequest
    from k2mlx.grammar.plan import constraint_for

    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "bad", "strict": True,
                                                "parameters": {"type": "object", "not": {"required": ["x"]}}}}]
    req = GenerationRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice="required")
    with pytest.raises(RequestError) as e:
        constraint_for(tiny_tokenizer, req, [1], [2])
    assert e.value.param == "tools" and "tools[1] (bad)" in str(e.value) and "not" in str(e.value)
    tools[1]["function"]["strict"] = False  # not strict: accepted, the keyword ignored
    assert constraint_for(tiny_tokenizer, req, [1], [2]) is not None


def test_compiled_grammars_are_cached_per_schema(tiny_tokenizer):
    lark = f"start: {json_rule({'type': 'object', 'properties': {'cached': {'type': 'boolean'}}}, True)}\n"
    first = gc.compile_grammar(tiny_tokenizer, lark, "response_format")
    t0 = time.perf_counter()
    assert gc.compile_grammar(tiny_tokenizer, lark, "response_format") is first
    assert time.perf_counter() - t0 < 0.05
    other = lark.replace("boolean", "integer")
    assert gc.compile_grammar(tiny_tokenizer, other, "response_format") is not first


def test_a_pathological_schema_hits_the_compile_timeout(tiny_tokenizer):
    # 120 alternatives of 20 bounded integers: about a second to compile here, far over the limit
    schema = {"anyOf": [{"type": "object", "required": [f"k{j}_{i}" for j in range(20)],
                         "properties": {f"k{j}_{i}": {"type": "integer", "minimum": i, "maximum": i * 1000 + 7}
                                        for j in range(20)}} for i in range(120)]}
    lark = f"start: {json_rule(schema, True)}\n"
    t0 = time.perf_counter()
    with pytest.raises(RequestError) as e:
        gc.compile_grammar(tiny_tokenizer, lark, "response_format", timeout=0.05)
    assert "too complex" in str(e.value) and time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    with pytest.raises(RequestError):  # the same schema again is refused at once, without compiling
        gc.compile_grammar(tiny_tokenizer, lark, "response_format", timeout=0.05)
    assert time.perf_counter() - t0 < 0.05


def test_free_requests_get_no_grammar(tiny_tokenizer):
    from k2mlx.engine.request import GenerationRequest

    msgs = [{"role": "user", "content": "x"}]
    assert reply_spec(tiny_tokenizer, GenerationRequest(messages=msgs), [1], []) is None
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert reply_spec(tiny_tokenizer, GenerationRequest(messages=msgs, tools=tools, tool_choice="none"), [1], []) is None
    assert reply_spec(tiny_tokenizer, GenerationRequest(prompt="raw", response_format={"type": "json_object"}), [1], []) is None


def test_a_bad_answer_schema_beside_tools_is_named_as_response_format(tiny_tokenizer):
    from k2mlx.engine.request import GenerationRequest
    from k2mlx.grammar.plan import constraint_for

    req = GenerationRequest(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {
        "name": "ok", "parameters": {"type": "object"}}}],
        response_format={"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(RequestError) as e:
        constraint_for(tiny_tokenizer, req, [1], [])
    assert e.value.param == "response_format" and "uniqueItems" in str(e.value)
