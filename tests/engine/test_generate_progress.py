"""`k2mlx generate` draws a prefill progress bar for a long prompt on a terminal's stderr, and
nothing of it where stderr is not a terminal."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

PROMPT = " ".join(f"line {i} of a long prompt about rivers and mills." for i in range(150))  # ~1,700 tokens


def gen(checkpoint, stderr):
    return subprocess.run([sys.executable, "-m", "k2mlx.cli", "generate", "--model", str(checkpoint), "--prompt",
                           PROMPT, "--temp", "0", "--max-tokens", "2"], stdout=subprocess.PIPE, stderr=stderr,
                          timeout=300)


def test_bar_on_a_terminal_only(tiny_checkpoint):
    master, slave = pty.openpty()
    try:
        p = gen(tiny_checkpoint, slave)
        os.close(slave)
        slave = None
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    tty_err = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, tty_err
    assert "prefill [" in tty_err and "tokens" in tty_err
    assert b"prefill [" not in p.stdout
    piped = gen(tiny_checkpoint, subprocess.PIPE)
    assert piped.returncode == 0 and b"prefill [" not in piped.stderr
    assert piped.stdout == p.stdout  # the reply itself is the same
