"""Streams never go silent (issue 14 item 4): from the moment a streamed request is accepted the
server sends bytes at least every 2 s, while it waits for the first token of a long prefill:
SSE comment lines on OpenAI streams, `ping` events on Anthropic streams.

A prompt of ~5,000 tokens takes seconds to prefill on a CPU even with the tiny model (the
attention is quadratic); the test checks that it did (else it would prove nothing)."""
from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

FIRST_BYTES_S = 2.0
MAX_GAP_S = 5.0
PROMPT_TOKENS = 5000  # 3,000 read in 2.8 s on a quiet 2-core machine: too short to prove anything


def timed_stream(url: str, body: dict) -> tuple[list[tuple[float, bytes]], float]:
    """-> ([(seconds since the request, bytes)], seconds until the first content)."""
    chunks: list[tuple[float, bytes]] = []
    first_content = None
    t0 = time.monotonic()
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for raw in r.iter_raw():
            now = time.monotonic() - t0
            chunks.append((now, raw))
            if first_content is None and (b'"text"' in raw and b'"text": ""' not in raw or b"text_delta" in raw):
                first_content = now
    return chunks, first_content if first_content is not None else chunks[-1][0]


def check(chunks, first_content: float, ping: bytes) -> None:
    times = [t for t, _ in chunks]
    assert times[0] < FIRST_BYTES_S, f"first bytes after {times[0]:.1f} s"
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps, default=0) < MAX_GAP_S, f"a {max(gaps):.1f} s silence: {[round(t, 1) for t in times]}"
    marks = ping if isinstance(ping, tuple) else (ping,)
    pings = [t for t, c in chunks if any(m in c for m in marks) and t < first_content]
    # the prefill really was long, and the silence was filled with keep-alives
    assert first_content > 3.0, f"prefill took only {first_content:.1f} s: the test proves nothing"
    assert len(pings) >= int(first_content / 2.0), (len(pings), first_content)


@pytest.fixture(scope="module")
def long_prompt_ids(tiny_tokenizer) -> list[int]:
    rng = random.Random(14)
    return [rng.randrange(0, tiny_tokenizer.num_base_tokens) for _ in range(PROMPT_TOKENS)]


def test_openai_stream_keeps_alive_during_a_long_prefill(server, long_prompt_ids):
    seen: list[dict] = []
    stop = threading.Event()

    def watch():  # GET /health shows the prefill's progress meanwhile
        while not stop.is_set():
            seen.extend(httpx.get(server + "/health", timeout=30).json()["prefill"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # /v1/completions has no head chunk: without keep-alives the first byte would come after prefill
        chunks, first = timed_stream(server + "/v1/completions", {"prompt": long_prompt_ids, "max_tokens": 2,
                                                                  "stream": True})
    finally:
        stop.set()
        watcher.join()
    # the silence is filled by keep-alives, or by the progress comments sent after each prefill chunk
    check(chunks, first, (b": keep-alive\n\n", b": prefill "))
    assert chunks[-1][1].endswith(b"data: [DONE]\n\n")
    assert seen and all(p["total"] == len(long_prompt_ids) and 0 <= p["done"] <= p["total"] for p in seen), seen


def test_anthropic_stream_pings_during_a_long_prefill(server, tiny_tokenizer, long_prompt_ids):
    text = tiny_tokenizer.decode(long_prompt_ids[::-1])  # not a prefix of the other test's prompt
    n = httpx.post(server + "/v1/messages/count_tokens", json={"messages": [{"role": "user", "content": text}]},
                   timeout=60).json()["input_tokens"]
    assert n > PROMPT_TOKENS // 2
    chunks, first = timed_stream(server + "/v1/messages", {"messages": [{"role": "user", "content": text}],
                                                           "max_tokens": 2, "stream": True})
    check(chunks, first, b"event: ping\ndata: {\"type\": \"ping\"}\n\n")
    assert b"message_start" in chunks[0][1] and b"message_stop" in chunks[-1][1]


async def test_cluster_status_carries_the_prefill_list(engine):
    """GET /v1/cluster (on a pipeline) adds the engine's prefill progress to the health snapshot."""
    from k2mlx.server import create_app

    engine.cluster_status = lambda: {"ranks": [{"rank": 0, "host": "mac1"}]}  # what health.snapshot gives
    try:
        app = create_app(engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            body = (await c.get("/v1/cluster")).json()
            health = (await c.get("/health")).json()
    finally:
        del engine.cluster_status
    assert body["ranks"][0]["host"] == "mac1" and body["prefill"] == [] and health["prefill"] == []


def test_disconnect_during_prefill_frees_the_slot(server, tiny_tokenizer):
    """A client that leaves while its long prompt is being read is cancelled at once: its next
    keep-alive finds the connection gone, and the engine drops the request at its next chunk."""
    from k2serve_util import metric

    rng = random.Random(99)
    ids = [rng.randrange(0, tiny_tokenizer.num_base_tokens) for _ in range(6000)]  # seconds to read; < 8,192 context
    cancelled = metric(server, "k2mlx_requests_finished_total", 'reason="cancelled"')
    with httpx.stream("POST", server + "/v1/completions", json={"prompt": ids, "max_tokens": 2, "stream": True},
                      timeout=60) as r:
        it = r.iter_raw()
        assert next(it).startswith(b": ")  # the keep-alive sent at once
        t0 = time.monotonic()
        while not httpx.get(server + "/health", timeout=30).json()["prefill"] and time.monotonic() - t0 < 30:
            time.sleep(0.1)  # until the engine is reading this prompt
    t_left = time.monotonic()
    while time.monotonic() - t_left < 8 and (metric(server, "k2mlx_active_slots") != 0 or
                                              httpx.get(server + "/health", timeout=30).json()["prefill"]):
        time.sleep(0.1)
    freed = time.monotonic() - t_left
    print(f"slot freed {freed:.2f} s after the client left")
    assert metric(server, "k2mlx_active_slots") == 0, "the slot is still busy 8 s after the client left"
    assert metric(server, "k2mlx_requests_finished_total", 'reason="cancelled"') == cancelled + 1
    assert freed < 8
