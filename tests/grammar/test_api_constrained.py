"""Constrained decoding through the HTTP API (the app served in-process on the tiny
random-weight checkpoint): OpenAI response_format and forced tool calls, Anthropic forced
tool use and output_format, and bad schemas answered with a 400 naming the keyword."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "alerts": {"type": "array", "items": {"enum": ["rain", "wind"]}, "maxItems": 2}}}
WEATHER = {"type": "object", "required": ["city"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}
OA_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
            {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]
AN_TOOLS = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER},
            {"name": "noop", "input_schema": {"type": "object", "properties": {}}}]
USER = [{"role": "user", "content": "Weather in Rome for 3 days, as JSON."}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from k2mlx import load
    from k2mlx.engine import Engine

    eng = Engine(*load(tiny_checkpoint), max_batch=4, model_name="k2-tiny")
    yield eng
    eng.close()


@pytest.fixture
async def client(engine):
    from k2mlx.server import create_app

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)),
                                 base_url="http://127.0.0.1", timeout=120) as c:
        yield c


def rf(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": strict}}


async def test_openai_json_schema_and_json_object(client):
    for seed in range(3):
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "temperature": 1, "seed": seed, "max_tokens": 200, "response_format": rf(SCHEMA)})
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        assert r.json()["constrained"] is True  # says it followed the grammar (the TUI shows it)
    free = await client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 8})
    assert free.status_code == 200 and "constrained" not in free.json()
    r = await client.post("/v1/chat/completions", json={
        "messages": USER, "temperature": 0, "max_tokens": 400, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


async def test_openai_streamed_json_schema(client):
    async with client.stream("POST", "/v1/chat/completions", json={
            "messages": USER, "temperature": 1, "seed": 7, "max_tokens": 200, "stream": True,
            "response_format": rf(SCHEMA)}) as r:
        lines = [ln[6:] async for ln in r.aiter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), SCHEMA)
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert last["constrained"] is True


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_openai_forced_tool_calls_validate(client, choice):
    for seed in range(3):
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "tools": OA_TOOLS, "tool_choice": choice, "temperature": 1, "seed": seed,
            "max_tokens": 200})
        choice_out = r.json()["choices"][0]
        assert choice_out["finish_reason"] == "tool_calls"
        for call in choice_out["message"]["tool_calls"]:
            name = call["function"]["name"]
            assert name in ("get_weather", "noop")
            if isinstance(choice, dict):
                assert name == "get_weather"
            schema = WEATHER if name == "get_weather" else OA_TOOLS[1]["function"]["parameters"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
async def test_anthropic_forced_tool_use_validates(client, tool_choice):
    for seed in range(3):
        r = await client.post("/v1/messages", json={
            "messages": USER, "tools": AN_TOOLS, "tool_choice": tool_choice, "temperature": 1, "seed": seed,
            "max_tokens": 200})
        assert r.status_code == 200, r.text
        body = r.json()
        uses = [b for b in body["content"] if b["type"] == "tool_use"]
        assert body["stop_reason"] == "tool_use" and uses
        for u in uses:
            assert u["name"] in ("get_weather", "noop")
            if tool_choice["type"] == "tool":
                assert u["name"] == "get_weather"
            jsonschema.validate(u["input"], WEATHER if u["name"] == "get_weather" else {"type": "object"})


async def test_anthropic_output_format(client):
    r = await client.post("/v1/messages", json={
        "messages": USER, "temperature": 1, "max_tokens": 200,
        "output_format": {"type": "json_schema", "schema": SCHEMA}})
    assert r.status_code == 200, r.text
    text = "".join(b["text"] for b in r.json()["content"] if b["type"] == "text")
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("route,body,keyword", [
    ("/v1/chat/completions", {"response_format": rf({"type": "array", "uniqueItems": True})}, "uniqueItems"),
    ("/v1/chat/completions", {"response_format": rf({"type": "nope"})}, "nope"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "not": {}}}}], "tool_choice": "required"}, "not"),
    ("/v1/messages", {"output_format": {"type": "json_schema", "schema": {"if": {}, "then": {}}}}, "if"),
])
async def test_bad_schemas_are_a_400_naming_the_keyword(client, route, body, keyword):
    r = await client.post(route, json={"messages": USER, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert keyword in err["message"] and ("schema" in err["message"] or "tools" in err["message"])
