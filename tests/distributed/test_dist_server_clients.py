"""The endpoint issue's client tests, unchanged, against a server whose model runs on two ranks
(`k2mlx serve --hosts 127.0.0.1,127.0.0.1`), as a pipeline and under tensor parallelism: the
engine and server run on top of `PipelineModel` / `TensorModel` exactly as on a local model
(prefix cache, batching, tools, streams)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))

import test_clients as _clients  # noqa: E402
from k2serve_util import start_server, stop_server  # noqa: E402

# every client test that runs against the shared `server` fixture (the others start their own
# single-process servers to check CLI flags, which says nothing about the pipeline)
for _name in dir(_clients):
    if _name.startswith("test_") and _name not in ("test_non_loopback_bind_without_key_is_refused",
                                                   "test_api_key_is_enforced",
                                                   "test_cluster_endpoint_absent_on_single_process"):
        globals()[_name] = getattr(_clients, _name)
oa, an = _clients.oa, _clients.an


@pytest.fixture(scope="module", params=["pipeline", "tensor"])
def server(tiny_checkpoint, tmp_path_factory, request):
    os.environ["K2MLX_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    proc, base = start_server(tiny_checkpoint, "--max-batch", "8", "--hosts", "127.0.0.1,127.0.0.1",
                              "--parallel", request.param)
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def no_stop(tiny_tokenizer) -> dict[str, float]:
    return {str(t): -100 for t in tiny_tokenizer.eos_token_ids}


def test_cluster_endpoint_lists_ranks(server):
    """GET /v1/cluster: rank 0's health snapshot (hosts, ranks, layers, memory, health)."""
    import httpx

    r = httpx.get(server + "/v1/cluster", timeout=10)
    assert r.status_code == 200
    ranks = r.json()["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert all(x["health"] == "ok" for x in ranks)
    layers = [x["layers"] for x in ranks]
    if r.json()["parallel"] == "tensor":  # every rank runs every layer (half of each)
        assert layers[0] == layers[1] == [0, 4]
    else:
        assert layers[0][0] == 0 and layers[1][0] == layers[0][1]  # contiguous [start, stop) split


# ---- structured output over the cluster: masks are applied on rank 0, to the logits it gathers --
def _constrained_requests():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "grammar"))
    from test_api_constrained import OA_TOOLS, SCHEMA, USER, rf

    return [("/v1/chat/completions", {"messages": USER, "temperature": 0, "max_tokens": 200,
                                      "response_format": rf(SCHEMA)}),
            ("/v1/chat/completions", {"messages": USER, "temperature": 0, "max_tokens": 200, "tools": OA_TOOLS,
                                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            ("/v1/chat/completions", {"messages": USER, "temperature": 0, "max_tokens": 300,
                                      "response_format": {"type": "json_object"}})], SCHEMA


def _answer(body: dict):
    msg = body["choices"][0]["message"]
    return msg.get("content"), [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]


@pytest.fixture(scope="module")
def one_process_constrained(tiny_checkpoint):
    """The same constrained requests answered by one process (the app in-process)."""
    import asyncio

    import httpx

    from k2mlx import load
    from k2mlx.engine import Engine
    from k2mlx.server import create_app

    reqs, _ = _constrained_requests()
    eng = Engine(*load(tiny_checkpoint), max_batch=4, model_name="k2-tiny")

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(eng)),
                                     base_url="http://127.0.0.1", timeout=120) as c:
            return [(await c.post(route, json=body)).json() for route, body in reqs]

    try:
        return asyncio.run(ask())
    finally:
        eng.close()


def test_structured_output_over_the_cluster_matches_one_process(server, one_process_constrained):
    """JSON schema, a forced tool call and json_object, greedy: the cluster (pipeline and tensor)
    answers exactly what one process answers, and the answers follow their schemas."""
    import json

    import httpx
    import jsonschema

    reqs, schema = _constrained_requests()
    for (route, body), ref in zip(reqs, one_process_constrained, strict=True):
        r = httpx.post(server + route, json=body, timeout=180)
        assert r.status_code == 200, r.text
        assert r.json().get("constrained") is True
        assert _answer(r.json()) == _answer(ref)
    content, _ = _answer(one_process_constrained[0])
    jsonschema.validate(json.loads(content), schema)
    (name, arguments), = _answer(one_process_constrained[1])[1]
    assert name == "get_weather" and isinstance(json.loads(arguments), dict)
    assert isinstance(json.loads(_answer(one_process_constrained[2])[0]), dict)
