"""Compilation stays on while engines live, and a process whose engine ran compiled code on its
model thread exits normally (mlx 0.32 aborted at exit: "terminate called without an active
exception", when such a thread's thread-local compile cache was destroyed during interpreter
finalization; see k2mlx/engine/threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import pytest

from k2mlx.engine.threads import can_observe_thread_exit

needs_proc = pytest.mark.skipif(not can_observe_thread_exit(), reason="thread exit is observed through /proc")


def _traces_of_a_compiled_function() -> int:
    """How often the Python body of a compiled function runs for 3 same-shape calls: 1 when
    compilation is on (traced once, then cached), 3 when it is off."""
    calls = []

    @mx.compile
    def f(x):
        calls.append(1)
        return x * 2 + 1

    for _ in range(3):
        mx.eval(f(mx.ones((4,))))
    return len(calls)


@needs_proc
def test_compilation_stays_on_while_an_engine_lives(tiny_checkpoint):
    from k2mlx import load
    from k2mlx.engine import Engine

    eng = Engine(*load(tiny_checkpoint), max_batch=1, cache_bytes=0)
    try:
        assert _traces_of_a_compiled_function() == 1  # was 3: compile switched off process-wide
    finally:
        eng.close()
    assert _traces_of_a_compiled_function() == 1


def _run_many(code: str, n: int) -> list[tuple[int, str]]:
    out = []
    for _ in range(n):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONFAULTHANDLER": ""})
        out.append((p.returncode, p.stderr[-300:]))
    return out


@needs_proc
def test_a_thread_that_ran_compiled_code_may_end_right_before_exit():
    """The bare mechanism: with a plain join() this aborts about half the runs (15 of 30 here)."""
    code = textwrap.dedent("""
        import threading
        import mlx.core as mx
        from k2mlx.engine.threads import join_fully

        @mx.compile
        def f(x):
            return mx.exp(x) * 2 + 1

        t = threading.Thread(target=lambda: mx.eval(f(mx.ones((4,)))))
        t.start()
        assert join_fully(t, timeout=10)
    """)
    runs = _run_many(code, 12)
    assert [r for r in runs if r[0] != 0] == []


@needs_proc
@pytest.mark.parametrize("close", [True, False], ids=["closed", "left-open"])
def test_a_process_exits_normally_after_its_engine_ran_compiled_code(tiny_checkpoint, close):
    """Compiled router on the model thread, then normal interpreter teardown; an engine left
    open is closed at exit (atexit), before the interpreter finalizes."""
    code = textwrap.dedent(f"""
        from k2mlx import load
        from k2mlx.engine import Engine
        from k2mlx.engine.request import GenerationRequest, SamplingParams

        eng = Engine(*load({str(tiny_checkpoint)!r}), max_batch=1, cache_bytes=0)
        req = GenerationRequest(prompt="hello", max_tokens=4, sampling=SamplingParams(temperature=0))
        assert [e for e in eng.generate(req)][-1].finish_reason in ("length", "stop")
        {"eng.close()" if close else ""}
    """)
    assert [r for r in _run_many(code, 2) if r[0] != 0] == []
