"""Regression tests for the hostile inputs of issue 13 that used to give a 500, a cut stream, a
forged metric or a completion for a foreign web page. The real server process (conftest's
`server`) unless a test needs to reach inside the app."""
from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from k2mlx.server.limits import MAX_DEPTH

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def nested(levels: int) -> dict:
    d: dict = {"type": "string"}
    for _ in range(levels):
        d = {"type": "object", "properties": {"x": d}}
    return d


DEEP = "@deep@"


def with_deep(body: dict, levels: int) -> str:
    """`body` as JSON text with the string DEEP replaced by a schema `levels` objects deep (as text:
    the client's own json.dumps would hit the recursion limit)."""
    deep = '{"type":"object","properties":{"x":' * levels + '{"type":"string"}' + "}}" * levels
    return json.dumps(body).replace(json.dumps(DEEP), deep)


def post_raw(base: str, path: str, text: str, **kw) -> httpx.Response:
    """POST a body given as JSON text, so it can hold escapes (`\\udc80`) json.dumps never writes."""
    return httpx.post(base + path, content=text.encode(), headers={"content-type": "application/json", **kw},
                      timeout=60)


def assert_4xx_json(r: httpx.Response, code: str | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str)
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- deep nesting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [250, 5000])  # JSON levels twice that: 500 gave a 500 (RecursionError
@pytest.mark.parametrize("where", ["tool_schema", "input_schema", "history_arguments"])  # in the template)
def test_deep_nesting_is_a_400_naming_the_field(server, where, levels):
    deep = DEEP
    if where == "tool_schema":
        path, body = "/v1/chat/completions", {"messages": USER, "max_tokens": 2,
                                              "tools": [{"type": "function", "function": {"name": "f",
                                                                                          "parameters": deep}}]}
        field = "tools"
    elif where == "input_schema":
        path, body = "/v1/messages", {"messages": USER, "max_tokens": 2,
                                      "tools": [{"name": "f", "input_schema": deep}]}
        field = "tools"
    else:
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": deep}}
        path, body = "/v1/chat/completions", {"max_tokens": 2, "messages": [
            {"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}, {"role": "user", "content": "and?"}]}
        field = "messages"
    r = post_raw(server, path, with_deep(body, levels))
    err = assert_4xx_json(r, "nesting_too_deep")
    assert r.status_code == 400 and err["param"] == field and err["message"].startswith(field)
    assert str(MAX_DEPTH) in err["message"]


def test_nesting_within_the_cap_is_served(server):
    body = {"messages": USER, "max_tokens": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": nested(20)}}]}
    assert httpx.post(server + "/v1/chat/completions", json=body, timeout=60).status_code == 200


# ---- lone surrogates ------------------------------------------------------------------------------
def test_lone_surrogate_in_tool_choice_is_a_4xx_on_both_routes(server):
    chat = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": %s, '
            '"tool_choice": {"type": "function", "function": {"name": "get_weather\\udc80"}}}' % json.dumps([TOOL]))
    err = assert_4xx_json(post_raw(server, "/v1/chat/completions", chat))
    assert err["param"] == "tool_choice"
    msgs = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
            '"tools": [{"name": "get_weather", "input_schema": {"type": "object"}}], '
            '"tool_choice": {"type": "tool", "name": "\\udc80"}}')
    r = post_raw(server, "/v1/messages", msgs)
    assert_4xx_json(r)
    assert r.json()["type"] == "error"


def test_lone_surrogate_in_an_echoed_prompt(server):
    body = '{"prompt": "caf\\udc80 ok", "echo": true, "max_tokens": 2}'
    r = post_raw(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("caf\ufffd ok")  # repaired, never a 500
    streamed = body[:-1] + ', "stream": true}'
    with httpx.stream("POST", server + "/v1/completions", content=streamed.encode(),
                      headers={"content-type": "application/json"}, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert json.loads(lines[0][6:])["choices"][0]["text"] == "caf\ufffd ok"
    assert lines[-1] == "data: [DONE]"


def test_surrogates_in_keys_and_messages_are_repaired(server):
    body = ('{"messages": [{"role": "user", "content": "\\ud83d hi \\ude00"}], "max_tokens": 2, '
            '"metadata": {"\\udc80": "\\udfff"}}')
    r = post_raw(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = post_raw(server, "/v1/messages", body)
    assert r.status_code == 200, r.text


# ---- /metrics -------------------------------------------------------------------------------------
def test_metrics_cannot_be_forged_and_stay_bounded(server):
    forged = '/x"} 1e9\nk2mlx_up 0\n#'
    with httpx.Client(base_url=server, timeout=30) as c:
        c.get(httpx.URL(server + "/").copy_with(raw_path=b"/x%22%7D%201e9%0Ak2mlx_up%200%0A%23"))
        c.get("/metrics")  # so the /metrics series itself exists in `before`
        before = c.get("/metrics").text
        for i in range(300):  # a scanner: every path new
            assert c.get(f"/scan/{i}/{'a' * (i % 50)}").status_code == 404
        text = c.get("/metrics").text
    assert forged not in text and "scan" not in text
    assert [ln for ln in text.splitlines() if ln.startswith("k2mlx_up")] == ["k2mlx_up 1"]
    http = [ln for ln in text.splitlines() if ln.startswith("k2mlx_http_requests_total{")]
    assert len(http) == len([ln for ln in before.splitlines() if ln.startswith("k2mlx_http_requests_total{")])
    for ln in http:
        assert re.fullmatch(r'k2mlx_http_requests_total\{route="[^"\\\n]*",status="\d{3}"\} \d+', ln), ln
    unmatched = [ln for ln in http if 'route="unmatched",status="404"' in ln]
    assert len(unmatched) == 1 and int(unmatched[0].split()[-1]) >= 300


def test_metrics_label_escaping():
    from k2mlx.server.metrics import HttpCounters, escape, render

    assert escape('a\\b"c\nd') == 'a\\\\b\\"c\\nd'

    class Engine:  # only the fields render() reads; the HTTP counter is what is under test
        class stats:
            requests = prompt_tokens = generated_tokens = queue_depth = active = 0
            tokens_per_second = 0.0
            finished = {'odd"\n': 1}

        class prefix_cache:
            hits = misses = cached_tokens = nbytes = 0

        max_batch, failure = 1, None

    counters = HttpCounters()
    counters.note('/v1/"x"\n', 200)
    lines = render(Engine, counters).splitlines()
    assert 'k2mlx_http_requests_total{route="/v1/\\"x\\"\\n",status="200"} 1' in lines
    assert 'k2mlx_requests_finished_total{reason="odd\\"\\n"} 1' in lines


# ---- size limits ----------------------------------------------------------------------------------
def test_huge_prompt_is_refused_by_size_before_tokenizing(server):
    limit = httpx.get(server + "/v1/models").json()["data"][0]["context_length"]
    big = "word " * 200_000  # 1 MB: far more than the context can hold
    r = httpx.post(server + "/v1/completions", json={"prompt": big, "max_tokens": 1}, timeout=60)
    err = assert_4xx_json(r, "context_length_exceeded")
    assert "bytes" in err["message"] and str(limit) in err["message"] and err["param"] == "prompt"
    r = httpx.post(server + "/v1/messages", json={"messages": [{"role": "user", "content": big}], "max_tokens": 1},
                   timeout=60)
    assert "bytes" in assert_4xx_json(r, "context_length_exceeded")["message"]
    # over the body limit: refused on its Content-Length, before the body is read
    r = httpx.post(server + "/v1/chat/completions", content=b"x" * (40 << 20),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


# ---- Host and Origin ------------------------------------------------------------------------------
def test_foreign_host_and_origin_are_refused(server):
    chat = {"messages": USER, "max_tokens": 2}
    r = httpx.post(server + "/v1/chat/completions", json=chat, headers={"Host": "evil.example"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
    # the classic drive-by: a cross-origin text/plain POST needs no preflight
    r = httpx.post(server + "/v1/chat/completions", content=json.dumps(chat).encode(),
                   headers={"Origin": "http://evil.example", "content-type": "text/plain"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(server + "/v1/messages", json=chat, headers={"Origin": "null"}, timeout=30)
    assert r.status_code == 403 and r.json()["type"] == "error"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80", "app.localhost"):
        assert httpx.get(server + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host


def test_loopback_origin_gets_cors_and_preflight(server):
    origin = "http://localhost:3000"
    r = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=30)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"]
    r = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, timeout=30)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.post(server + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                   headers={"Origin": origin}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin


async def test_allow_origin_and_api_key_in_process(engine):
    from k2mlx.server import create_app

    app = create_app(engine, api_key="sekrit", allow_origins=("https://chat.example", "app://obsidian.md"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://my-mac.lan") as c:
        # with a key, any Host name is served (the key is the protection)...
        ok = {"Authorization": "Bearer sekrit"}
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401
        # ...and Origin is still checked: the allowed one passes, others do not
        r = await c.get("/v1/models", headers={**ok, "Origin": "https://chat.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://chat.example"
        assert (await c.get("/v1/models", headers={**ok, "Origin": "https://chat.example.evil"})).status_code == 403
        assert (await c.get("/v1/models", headers={**ok, "Origin": "app://obsidian.md"})).status_code == 200
        assert (await c.get("/v1/models", headers={**ok, "Origin": "app://localhost"})).status_code == 403


# ---- error bodies ---------------------------------------------------------------------------------
async def test_500_is_generic_with_a_request_id_and_logged_once(engine, caplog):
    from k2mlx.server import create_app

    def broken_status():  # what a failing health snapshot on a pipeline does
        raise RuntimeError("secret internal detail /Users/me/model")

    engine.cluster_status = broken_status
    try:
        app = create_app(engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            with caplog.at_level(logging.ERROR, logger="k2mlx.server"):
                r = await c.get("/v1/cluster")
    finally:
        del engine.cluster_status
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    err = r.json()["error"]
    assert "secret" not in r.text and "RuntimeError" not in r.text and rid in err["message"]
    assert err["type"] == "server_error"
    logged = [rec for rec in caplog.records if rec.exc_info and rid in rec.getMessage()]
    assert len(logged) == 1 and "secret internal detail" in str(logged[0].exc_info[1])


def test_405_carries_allow_and_json(server):
    for path, allow in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"), ("/health", "GET")):
        r = httpx.request("DELETE", server + path, timeout=30)
        assert r.status_code == 405 and allow in r.headers["allow"], (path, r.headers)
        assert r.json()["error"]["code"] == "405"
    assert "x-request-id" in httpx.get(server + "/health", timeout=30).headers


# ---- API key out of ps -----------------------------------------------------------------------------
def test_api_key_from_env_or_file(tmp_path, monkeypatch, capsys):
    import argparse

    from k2mlx.commands.serve import add_arguments, resolve_api_key
    from k2mlx.errors import RequestError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "K2MLX_API_KEY" in parser.format_help() and "--api-key-file" in parser.format_help()
    monkeypatch.delenv("K2MLX_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("from-file\n")
    assert resolve_api_key(parser.parse_args(["--api-key-file", str(key)])) == "from-file"
    monkeypatch.setenv("K2MLX_API_KEY", "from-env")
    assert resolve_api_key(parser.parse_args([])) == "from-env"
    assert resolve_api_key(parser.parse_args(["--api-key-file", str(key)])) == "from-file"
    monkeypatch.delenv("K2MLX_API_KEY")
    assert resolve_api_key(parser.parse_args(["--api-key", "argv"])) == "argv"
    assert "ps" in capsys.readouterr().err  # the visible one is warned about
    (tmp_path / "empty").write_text("\n")
    for bad in (str(tmp_path / "empty"), str(tmp_path / "missing")):
        with pytest.raises(RequestError, match="api-key-file"):
            resolve_api_key(parser.parse_args(["--api-key-file", bad]))


def test_masked_logprobs_stay_valid_json():
    """A token a grammar masked has logprob -inf, which strict JSON cannot carry (the response
    class refuses NaN/inf, so it would have been a 500): it is written as OpenAI does, -9999.0."""
    from k2mlx.server.errors import JSON
    from k2mlx.server.sse import _lp_entries, completion_logprobs

    entries = [("a", float("-inf"), (("a", -0.1), ("b", float("-inf")))), ("c", float("nan"), ())]
    chat = _lp_entries(entries)
    assert [e["logprob"] for e in chat] == [-9999.0, -9999.0] and chat[0]["top_logprobs"][1]["logprob"] == -9999.0
    text = completion_logprobs(entries, 0)
    assert text["token_logprobs"] == [-9999.0, -9999.0] and text["top_logprobs"][0]["b"] == -9999.0
    assert json.loads(JSON({"chat": chat, "text": text}).body)["text"]["token_logprobs"][0] == -9999.0
