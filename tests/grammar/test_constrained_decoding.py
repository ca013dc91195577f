"""Issue 15's acceptance checks on random-weight tiny K2 checkpoints, through the real engine:
schema-valid JSON at temperature 1 over several seeds and varied schemas, forced tool calls
whose arguments validate, json_object that parses, free reasoning before a constrained answer
on a thinking checkpoint, and constrained + free sequences sharing one batch unchanged."""
from __future__ import annotations

import json

import jsonschema
import pytest

from k2mlx.engine.request import GenerationRequest, SamplingParams
from k2mlx.events import Done, ParseWarning, ReasoningDelta, TextDelta, ToolCallBegin, ToolCallEnd

SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "ok"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
            "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 130}}},
        "ok": {"type": "boolean"}}},
    "arrays": {"type": "object", "required": ["tags", "scores"], "additionalProperties": False, "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4}}},
    "nullable": {"type": "object", "required": ["note", "level"], "additionalProperties": False, "properties": {
        "note": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
        "level": {"enum": ["low", "mid", "high"]}, "extra": {"type": "integer"}}},
    "list_of_refs": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"$ref": "#/$defs/point"},
                     "$defs": {"point": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                                         "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
        "type": "object", "required": ["a", "b"], "additionalProperties": False,
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer"}}}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "Answer in JSON please."}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from k2mlx import load
    from k2mlx.engine import Engine

    eng = Engine(*load(tiny_checkpoint), max_batch=4, cache_bytes=0)
    yield eng
    eng.close()


def chat(temp=1.0, seed=0, n=300, bias=None, **kw) -> GenerationRequest:
    return GenerationRequest(messages=USER, max_tokens=n, sampling=SamplingParams(temperature=temp, seed=seed,
                                                                                 logit_bias=bias or {}), **kw)


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def json_schema(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_weights_always_give_schema_valid_json(engine, name):
    schema = SCHEMAS[name]
    for seed in range(5):
        events = list(engine.generate(chat(seed=seed, response_format=json_schema(schema))))
        done = events[-1]
        assert isinstance(done, Done) and done.finish_reason == "stop", (seed, done)
        jsonschema.validate(json.loads(text_of(events)), schema)


def test_random_weights_alone_never_give_json(engine):
    """The baseline the mask is measured against: the same seeds, unconstrained."""
    for seed in range(5):
        text = text_of(engine.generate(chat(seed=seed, n=40)))
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.slow
def test_json_object_always_parses(engine):
    # any object: a random model's keys and strings run long (here up to ~1,200 tokens), so the
    # budget is large; nothing bounds them but the model closing its quotes
    for seed in range(5):
        events = list(engine.generate(chat(seed=seed, n=1600, response_format={"type": "json_object"})))
        assert events[-1].finish_reason == "stop"
        assert isinstance(json.loads(text_of(events)), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}},
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_name_declared_tools_with_valid_arguments(engine, choice):
    for seed in range(4):
        events = list(engine.generate(chat(seed=seed, tools=TOOLS, tool_choice=choice)))
        begins = [e for e in events if isinstance(e, ToolCallBegin)]
        ends = [e for e in events if isinstance(e, ToolCallEnd)]
        assert events[-1].finish_reason == "tool_calls" and begins and len(begins) == len(ends)
        assert not [e for e in events if isinstance(e, ParseWarning)]
        for b, e in zip(begins, ends):
            assert b.name in PARAMS and e.valid_json
            if isinstance(choice, dict):
                assert b.name == choice["function"]["name"]
            jsonschema.validate(json.loads(e.arguments), PARAMS[b.name])


def test_auto_tool_calls_are_declared_and_valid(engine):
    """Under auto the model may answer or call; whatever it calls is declared and validates."""
    sp = engine.tokenizer.special_tokens
    bias = {sp["<|tool_calls_section_begin|>"]: 6.0}  # make a call likely from a random model
    calls = 0
    for seed in range(6):
        events = list(engine.generate(chat(seed=seed, n=200, tools=TOOLS, bias=bias)))
        for e in events:
            if isinstance(e, ToolCallEnd):
                if not e.valid_json:  # only a call cut off by max_tokens may be incomplete
                    assert events[-1].finish_reason == "length" and e is [x for x in events if isinstance(x, ToolCallEnd)][-1]
                    continue
                calls += 1
                begin = next(b for b in events if isinstance(b, ToolCallBegin) and b.index == e.index)
                jsonschema.validate(json.loads(e.arguments), PARAMS[begin.name])
        if events[-1].finish_reason != "length":  # (a call cut off by max_tokens is reported as such)
            assert not [e for e in events if isinstance(e, ParseWarning)]
    assert calls >= 3


def test_a_batch_of_constrained_and_free_requests_equals_each_alone(tiny_checkpoint, engine):
    from k2mlx import load
    from k2mlx.engine import Engine

    tok = engine.tokenizer
    no_stop = {t: -100.0 for t in tok.eos_token_ids}
    reqs = [lambda: chat(temp=0.0, n=60, response_format=json_schema(SCHEMAS["nested"])),
            lambda: chat(temp=0.0, n=16, bias=no_stop, logprobs=True, top_logprobs=2),
            lambda: chat(temp=0.0, n=60, tools=TOOLS, tool_choice="required"),
            lambda: chat(temp=0.0, n=16, bias=no_stop, stop=["e"])]
    alone = Engine(*load(tiny_checkpoint), max_batch=1, cache_bytes=0)
    try:
        want = [list(alone.generate(r())) for r in reqs]
    finally:
        alone.close()
    streams = [engine.generate(r()) for r in reqs]  # all four in flight in one batch
    got = [list(s) for s in streams]
    strip = lambda evs: [e for e in evs if not isinstance(e, Done)]
    assert [strip(g) for g in got] == [strip(w) for w in want]
    assert [g[-1].finish_reason for g in got] == [w[-1].finish_reason for w in want]
    assert got[1][0].logprobs is not None  # logprobs still attached beside constrained neighbours
    assert got[3][-1].finish_reason == "stop" and "e" not in text_of(got[3])  # stop string still cuts


def test_thinking_checkpoint_reasons_freely_then_answers_in_json(tiny_thinking_checkpoint):
    from k2mlx import load
    from k2mlx.engine import Engine

    eng = Engine(*load(tiny_thinking_checkpoint), max_batch=2, cache_bytes=0)
    try:
        sp = eng.tokenizer.special_tokens
        bias = {sp["<think>"]: 100.0, sp["</think>"]: 5.0}  # open reasoning, and close it before long
        schema = SCHEMAS["arrays"]
        free = 0
        for seed in range(4):
            events = list(eng.generate(chat(seed=seed, bias=bias, response_format=json_schema(schema))))
            reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
            assert events[-1].finish_reason == "stop"
            jsonschema.validate(json.loads(text_of(events)), schema)
            free += bool(reasoning) and not reasoning.startswith("{")  # the JSON grammar would have refused it
        assert free >= 2
    finally:
        eng.close()


class _Pending:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _TwoPhase:
    """The tiny model behind the two-phase `submit`/`result` interface a pipeline has, so the
    engine splits sequences into micro-batch groups stepped on their own threads (overlap.py)."""

    stages = 2

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, cache=None):
        return self.model(tokens, cache=cache)

    def submit(self, tokens, cache):
        import mlx.core as mx

        logits = self.model(tokens, cache=cache)
        mx.eval(logits)
        return _Pending(logits)


def test_constrained_sequences_in_micro_batch_groups_equal_alone(tiny_checkpoint, engine):
    """On a pipeline the masks are applied where sampling runs (rank 0's groups): the grouped,
    overlapped engine gives every request what it gets alone."""
    from k2mlx import load
    from k2mlx.engine import Engine

    model, tok = load(tiny_checkpoint)
    no_stop = {t: -100.0 for t in tok.eos_token_ids}
    reqs = [lambda: chat(temp=0.0, n=40, response_format=json_schema(SCHEMAS["arrays"])),
            lambda: chat(temp=0.0, n=12, bias=no_stop),
            lambda: chat(temp=0.0, n=60, tools=TOOLS, tool_choice="required"),
            lambda: chat(temp=0.0, n=12, bias=no_stop)]
    want = [list(engine.generate(r())) for r in reqs]  # one at a time
    grouped = Engine(_TwoPhase(model), tok, max_batch=4, cache_bytes=0)
    try:
        assert grouped.n_groups == 2
        streams = [grouped.generate(r()) for r in reqs]
        got = [list(s) for s in streams]
    finally:
        grouped.close()
    strip = lambda evs: [e for e in evs if not isinstance(e, Done)]
    assert [strip(g) for g in got] == [strip(w) for w in want]
    assert got[2][-1].finish_reason == "tool_calls" and [g[-1].finish_reason for g in got] == [w[-1].finish_reason for w in want]
