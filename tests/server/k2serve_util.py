"""Starting and stopping real `k2mlx serve` processes for the server tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *extra: str, log_path=None):
    """`log_path`: write the server's output there (else a pipe, read only if it exits early)."""
    port = free_port()
    cmd = [sys.executable, "-m", "k2mlx.cli", "serve", "--model", str(checkpoint), "--port", str(port),
           "--model-name", "k2-tiny", *extra]
    out = open(log_path, "wb") if log_path else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    if log_path:
        out.close()  # the child holds its own copy
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            text = open(log_path, "rb").read() if log_path else proc.stdout.read()
            raise RuntimeError(f"server exited: {text.decode(errors='replace')}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 120 s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()



def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(base + "/metrics", timeout=5).text
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
