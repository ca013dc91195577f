"""Huge prompts against a real `k2mlx serve`: how long a 30-million-character prompt takes to be
refused, the server's peak memory, and how slow `/health` gets while four such requests are in
flight (issue 13). Run it against two checkouts side by side to compare them:

    python scripts/bench_huge_prompts.py                  # this checkout
    python scripts/bench_huge_prompts.py --root OLD_TREE  # another one (e.g. `git archive REV | tar -x`)

The server runs the default model (k2-nano) on loopback; nothing else is contacted."""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def run(base: str, chars: int, concurrent: int) -> dict:
    body = ('{"prompt": "' + "word " * (chars // 5) + '", "max_tokens": 1}').encode()
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        async def send() -> str:
            try:
                r = await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                return str(r.status_code)
            except httpx.TransportError:  # refused while we were still uploading: the server closed
                return "closed"

        t0 = time.perf_counter()
        status = await send()
        one = time.perf_counter() - t0
        latencies: list[float] = []
        stop = asyncio.Event()

        async def poll():
            async with httpx.AsyncClient(base_url=base, timeout=600) as h:
                while not stop.is_set():
                    t = time.perf_counter()
                    await h.get("/health")
                    latencies.append(time.perf_counter() - t)
                    await asyncio.sleep(0.05)

        poller = asyncio.ensure_future(poll())
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        await asyncio.gather(*(send() for _ in range(concurrent)))
        all_done = time.perf_counter() - t0
        stop.set()
        await poller
    return {"status": status, "one_s": one, "all_s": all_done, "health_p50_ms": 1000 * statistics.median(latencies),
            "health_max_ms": 1000 * max(latencies), "polls": len(latencies)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="checkout whose k2mlx to run (default: this one)")
    ap.add_argument("--chars", type=int, default=30_000_000)
    ap.add_argument("--concurrent", type=int, default=4)
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "k2mlx.cli", "serve", "--port", str(port)], cwd=args.root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rss0 = peak_rss_mb(proc.pid)
        res = asyncio.run(run(base, args.chars, args.concurrent))
        res["peak_rss_mb"], res["rss_at_start_mb"] = peak_rss_mb(proc.pid), rss0
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{args.root}: a {args.chars:,}-char prompt -> {res['status']} in {res['one_s']:.2f} s; "
          f"{args.concurrent} at once done in {res['all_s']:.2f} s; /health meanwhile p50 {res['health_p50_ms']:.0f} ms, "
          f"max {res['health_max_ms']:.0f} ms ({res['polls']} polls); server peak RSS {res['peak_rss_mb']:.0f} MB "
          f"(at start {res['rss_at_start_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
