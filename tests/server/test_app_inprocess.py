"""`create_app(engine)` served in-process (as the TUI does), including the cluster-failure path."""
from __future__ import annotations

import httpx

from k2mlx.errors import ClusterError


async def test_in_process_app_and_503_after_a_cluster_failure(engine):
    from k2mlx.server import create_app

    app = create_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "k2-tiny"
        engine.fail(ClusterError("connection to a peer was lost", host="mac2", rank=1))
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and "mac2" in err["message"] and "rank 1" in err["message"]
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["type"] == "error"
