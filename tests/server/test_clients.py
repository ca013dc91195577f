"""The real server driven by the official openai and anthropic clients and raw httpx."""
from __future__ import annotations

import json
import subprocess
import sys

import anthropic
import httpx
import openai
import pytest

from k2serve_util import start_server, stop_server

USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="anything")


@pytest.fixture(scope="module")
def an(server):
    return anthropic.Anthropic(base_url=server, api_key="anything")


def sse_lines(resp) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_models_list(oa):
    ids = [m.id for m in oa.models.list().data]
    assert ids == ["k2-tiny"]
    assert oa.models.retrieve("k2-tiny").id == "k2-tiny"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")


def test_chat_non_streaming_has_usage_and_finish_reason(oa, no_stop):
    r = oa.chat.completions.create(model="whatever", messages=USER, max_tokens=6, temperature=0, logit_bias=no_stop)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_both_max_token_fields_give_length(oa, no_stop, field):
    r = oa.chat.completions.create(model="k2-tiny", messages=USER, temperature=0, logit_bias=no_stop, **{field: 3})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    chunks = list(oa.chat.completions.create(model="k2-tiny", messages=USER, temperature=0, logit_bias=no_stop,
                                             stream=True, **{field: 3}))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_first_delta_and_include_usage(oa, server, no_stop):
    chunks = list(oa.chat.completions.create(model="k2-tiny", messages=USER, max_tokens=5, temperature=0,
                                             logit_bias=no_stop, stream=True,
                                             stream_options={"include_usage": True}))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = oa.chat.completions.create(model="k2-tiny", messages=USER, max_tokens=5, temperature=0, logit_bias=no_stop)
    assert text == r.choices[0].message.content  # streaming and not give the same greedy text

    # raw: content is "" (not null) in the first delta, and the stream ends with [DONE]
    body = {"model": "k2-tiny", "messages": USER, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        data = sse_lines(resp)
    assert json.loads(data[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[-1] == "[DONE]"


def test_cached_tokens_reported_on_a_repeated_prefix(oa, no_stop):
    long = [{"role": "system", "content": "You are terse. " * 40}, *USER]
    a = oa.chat.completions.create(model="k2-tiny", messages=long, max_tokens=2, temperature=0, logit_bias=no_stop)
    b = oa.chat.completions.create(model="k2-tiny", messages=long, max_tokens=2, temperature=0, logit_bias=no_stop)
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 1
    assert a.choices[0].message.content == b.choices[0].message.content


def test_seed_reproducible_over_http(oa, no_stop):
    kw = dict(model="k2-tiny", messages=USER, max_tokens=8, temperature=1.0, top_p=0.95, logit_bias=no_stop)
    a = oa.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = oa.chat.completions.create(seed=11, **kw).choices[0].message.content
    assert a == b


def test_logprobs_and_stop(oa, no_stop):
    r = oa.chat.completions.create(model="k2-tiny", messages=USER, max_tokens=4, temperature=0, logit_bias=no_stop,
                                   logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)
    assert "".join(e.token for e in lp) == r.choices[0].message.content


def test_tools_and_named_tool_choice(oa, no_stop):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = list(oa.chat.completions.create(
        model="k2-tiny", messages=USER, tools=tools, max_tokens=4, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id == "functions.get_weather:0" and calls[0].function.name == "get_weather"
    assert all(tc.index == 0 for tc in calls) and all(tc.id is None for tc in calls[1:])
    # tool_choice none: the tool-call section can never start
    r = oa.chat.completions.create(model="k2-tiny", messages=USER, tools=tools, tool_choice="none", max_tokens=6,
                                   temperature=0, logit_bias=no_stop)
    assert not r.choices[0].message.tool_calls


def test_response_format_json_object_accepted(oa, no_stop):
    r = oa.chat.completions.create(model="k2-tiny", messages=USER, max_tokens=3, temperature=0,
                                   response_format={"type": "json_object"}, logit_bias=no_stop,
                                   extra_body={"some_unknown_field": {"x": 1}, "top_k": 5})
    assert r.choices[0].finish_reason == "length"


def test_completions_with_suffix_streams_text(oa, server, no_stop):
    chunks = list(oa.completions.create(model="k2-tiny", prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))",
                                        max_tokens=6, temperature=0, stream=True, logit_bias=no_stop))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)  # some text came
    r = oa.completions.create(model="k2-tiny", prompt="hello world", max_tokens=4, temperature=0, logit_bias=no_stop,
                              logprobs=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert "".join(r.choices[0].logprobs.tokens) == r.choices[0].text
    with httpx.stream("POST", server + "/v1/completions", timeout=30,
                      json={"prompt": "hello", "suffix": "world", "max_tokens": 2, "stream": True}) as resp:
        assert sse_lines(resp)[-1] == "[DONE]"


def test_anthropic_messages_stream_and_count_tokens(an, no_stop):
    with an.messages.stream(model="k2-tiny", max_tokens=5, messages=USER, system="Be brief.",
                            extra_body={"temperature": 0}) as stream:
        types = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "message_delta" in types
    assert final.role == "assistant" and final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens >= 1
    if final.stop_reason == "max_tokens":
        assert "content_block_delta" in types and final.usage.output_tokens == 5
    count = an.messages.count_tokens(model="k2-tiny", messages=USER, system="Be brief.")
    # Anthropic counts cache reads apart: input + cache_read is the whole prompt
    assert count.input_tokens == final.usage.input_tokens + final.usage.cache_read_input_tokens
    msg = an.messages.create(model="k2-tiny", max_tokens=3, messages=USER, system="Be brief.",
                             extra_body={"temperature": 0})
    assert msg.type == "message"
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == count.input_tokens
    assert msg.usage.cache_read_input_tokens > 0  # the same prompt again: a prefix-cache hit, not double-counted


def test_anthropic_tool_use_round_trip_is_accepted(an):
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}]
    msgs = [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                                      "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"}]}]
    r = an.messages.create(model="k2-tiny", max_tokens=3, messages=msgs, tools=tools,
                           tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    assert r.content and r.content[0].type == "tool_use" and r.content[0].name == "get_weather"


def test_health_and_metrics(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    text = httpx.get(server + "/metrics").text
    for name in ("k2mlx_requests_total", "k2mlx_generation_tokens_total", "k2mlx_generation_tokens_per_second",
                 "k2mlx_queue_depth", "k2mlx_active_slots", "k2mlx_prefix_cache_hits_total"):
        assert f"# TYPE {name} " in text


def test_non_loopback_bind_without_key_is_refused(tiny_checkpoint):
    r = subprocess.run([sys.executable, "-m", "k2mlx.cli", "serve", "--model", str(tiny_checkpoint), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--api-key" in r.stderr and "0.0.0.0" in r.stderr


def test_api_key_is_enforced(tiny_checkpoint):
    proc, base = start_server(tiny_checkpoint, "--api-key", "sekret", "--max-batch", "2")
    try:
        r = httpx.post(base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sekret").chat.completions.create(
            model="k2-tiny", messages=USER, max_tokens=1)
        assert ok.usage.completion_tokens == 1
        r = httpx.post(base + "/v1/messages", headers={"x-api-key": "sekret"},
                       json={"messages": USER, "max_tokens": 1})
        assert r.status_code == 200
    finally:
        stop_server(proc)


def test_anthropic_stop_sequences(an, no_stop):
    extra = {"temperature": 0, "logit_bias": no_stop}
    full = an.messages.create(model="k2-tiny", max_tokens=24, messages=USER, extra_body=extra)
    text = "".join(b.text for b in full.content if b.type == "text")
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    cut = an.messages.create(model="k2-tiny", max_tokens=24, messages=USER, stop_sequences=[stop], extra_body=extra)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content if b.type == "text") == text[: text.index(stop)]


def test_timings_reported_in_stream_and_body(server, no_stop):
    """The engine's measured speeds ride along as an extra `timings` field (the TUI's status bar)."""
    req = {"model": "k2-tiny", "messages": USER, "max_tokens": 4, "temperature": 0, "logit_bias": no_stop}
    body = httpx.post(server + "/v1/chat/completions", json=req, timeout=60).json()
    t = body["timings"]
    # timings count the prompt tokens prefilled; a prefix-cache hit (an earlier test's prompt) is not
    u = body["usage"]
    assert t["generated_tokens"] == 4
    assert t["prompt_tokens"] == u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and t["decode_tps"] > 0
    with httpx.stream("POST", server + "/v1/chat/completions", json={**req, "stream": True}, timeout=60) as r:
        chunks = [json.loads(x) for x in sse_lines(r) if x != "[DONE]"]
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert last["timings"]["generated_tokens"] == 4 and last["timings"]["decode_tps"] > 0


def test_cluster_endpoint_absent_on_single_process(server):
    r = httpx.get(server + "/v1/cluster", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_a_cluster"
