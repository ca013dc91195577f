"""The persistent prompt cache through `k2mlx serve`: a restarted server reuses a long system
prompt from disk and says so in usage; garbled files do not stop it; --no-prompt-cache is off."""
from __future__ import annotations

import httpx

from tests.server.k2serve_util import start_server, stop_server

SYSTEM = " ".join(f"rule {i}: keep the tests green and the diffs small." for i in range(120))  # ~1,500 tokens


def chat(base: str, question: str) -> dict:
    r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "model": "k2-tiny", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r.json()


def cached(body: dict) -> int:
    return (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def test_restart_hits_the_disk_cache_and_bad_files_are_dropped(tiny_checkpoint, tmp_path):
    folder = tmp_path / "pc"
    args = ("--prompt-cache-dir", str(folder), "--cache-gb", "0")  # no memory cache: only the disk can hit
    proc, base = start_server(tiny_checkpoint, *args)
    try:
        first = chat(base, "What does rule 3 say?")
    finally:
        stop_server(proc)
    assert cached(first) == 0 and first["usage"]["prompt_tokens"] > 512
    blocks = sorted(folder.rglob("*.kvblock"))
    assert blocks, "the first server wrote nothing"

    proc, base = start_server(tiny_checkpoint, *args)
    try:
        again = chat(base, "And rule 7?")
    finally:
        stop_server(proc)
    assert cached(again) >= 256 and cached(again) % 256 == 0

    for f in blocks:  # every block garbled: the server still answers, from scratch
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x55
        f.write_bytes(bytes(data))
    proc, base = start_server(tiny_checkpoint, *args)
    try:
        third = chat(base, "And rule 9?")
        assert httpx.get(base + "/health", timeout=5).status_code == 200
    finally:
        stop_server(proc)
    assert cached(third) == 0


def test_no_prompt_cache_writes_nothing(tiny_checkpoint, tmp_path):
    folder = tmp_path / "pc"
    proc, base = start_server(tiny_checkpoint, "--prompt-cache-dir", str(folder), "--no-prompt-cache")
    try:
        chat(base, "What does rule 3 say?")
    finally:
        stop_server(proc)
    assert not list(folder.rglob("*.kvblock"))
