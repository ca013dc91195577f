"""Ending threads that ran MLX compiled code, so the process can exit normally afterwards.

MLX keeps its compile cache per thread (`thread_local`), and the cache holds Python objects.
When such a thread ends, its C++ thread-local destructors run after Python has already let
`Thread.join()` return, and they take the GIL to drop those objects. If the interpreter is
finalizing by then, CPython ends the thread inside that destructor and the C++ runtime aborts
the process: "terminate called without an active exception" (mlx 0.32.4, CPU backend: a thread
that ran an `mx.compile`d function, joined just before exit, aborted 15 of 30 runs; gdb shows
`~CompileCache` -> `PyGILState_Ensure` -> `pthread_exit` in `__call_tls_dtors`).

So a thread counts as finished only once its OS thread is gone. On Linux the kernel removes
`/proc/self/task/TID` after the thread's destructors ran; `join_fully` waits for that. Where
that cannot be observed (no /proc) and the backend is not Metal, `compile_must_stay_off()` says
so and the engine falls back to switching compilation off while it lives.
"""
from __future__ import annotations

import os
import threading
import time


def _task_path(tid: int) -> str:
    return f"/proc/self/task/{tid}"


def can_observe_thread_exit() -> bool:
    return os.path.isdir(_task_path(threading.get_native_id()))


def compile_must_stay_off() -> bool:
    """True only where the abort above cannot be avoided by waiting: off Metal without /proc."""
    import mlx.core as mx

    return not mx.metal.is_available() and not can_observe_thread_exit()


def join_fully(thread: threading.Thread, timeout: float) -> bool:
    """Join `thread`, then wait (up to `timeout` more seconds) until its OS thread, thread-local
    destructors included, has ended. Returns whether it has."""
    thread.join(timeout)
    if thread.is_alive():
        return False
    tid = thread.native_id
    if tid is None or not can_observe_thread_exit():
        return True
    path, deadline = _task_path(tid), time.monotonic() + timeout
    while os.path.exists(path):  # a reused TID only costs the bounded wait
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
