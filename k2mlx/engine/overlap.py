"""Micro-batch groups: how the engine keeps every pipeline stage busy.

With a pipelined model (one that has `submit(tokens, cache) -> pending` and `pending.result()`),
the engine splits its sequences into groups, each with its own mlx-lm `BatchGenerator`. A
group's generator runs on its own thread, but only ever while the model thread waits for it
(a coroutine made of a thread: exactly one of them runs MLX code at any moment). Its model is a
view whose `__call__` submits the step to the pipeline and then hands control back, so the
model thread can submit the next group's step before collecting this one's logits:

    A: submit -> pause      B: submit -> pause      A: result, sample, submit -> pause   ...

While the last rank computes A, rank 0 computes B. Results come back in submit order.

Why threads and not a rewrite of `BatchGenerator.next()`: the model call sits deep inside
mlx-lm's prefill and decode code; pausing there keeps its batching, sampling and cache logic
exactly as they are for a local model.

MLX streams belong to the thread that made them (mlx 0.32: evaluating a lazy array built on
another thread fails with "There is no Stream(...) in current thread"). So everything that
touches a group's generator (insert, remove, next) runs on the group's thread through `call()`,
and caches leaving the group (finished sequences, for the prefix cache) are evaluated there.
"""
from __future__ import annotations

import logging
import threading

import mlx.core as mx

log = logging.getLogger("k2mlx.engine")


class _Quit(BaseException):
    """Unwinds an abandoned group's thread (never reaches the engine's handlers)."""


class GroupModel:
    """The model a group's BatchGenerator sees: submit, pause until resumed, then the logits."""

    def __init__(self, pipe, runner: "GroupRunner"):
        from k2mlx.engine.prefill import Ahead, vocab_of

        self._pipe, self._runner = pipe, runner
        # prompt chunks do not wait for their (discarded) logits: see prefill.py
        self.ahead = Ahead(int(getattr(pipe, "stages", 2)), vocab_of(pipe))

    def __getattr__(self, name):  # args, layers, make_cache ... come from the pipeline
        return getattr(self._pipe, name)

    def make_cache(self):
        return self._pipe.make_cache()

    def __call__(self, tokens, cache=None):
        pending = self._pipe.submit(tokens, cache)
        try:
            self._runner._pause()
        except _Quit:
            if self._runner._drain:  # keep the pipeline's results in order for the other groups
                try:
                    pending.result()
                except Exception:  # the group is being abandoned; its owner reports the failure
                    log.debug("abandoned group's step failed", exc_info=True)
            raise
        return self.ahead.settle(pending, tokens)


class GroupRunner:
    """Runs `bg.next()` of one group on a private thread, in lock step with the model thread.

    `step()` starts a `next()` and `resume()` continues one; both return when the group either
    paused after a submit (`("submitted", None)`), finished its `next()` (`("done", result)`)
    or failed (`("error", exc)`)."""

    def __init__(self, name: str):
        self.bg = None
        self.paused = False
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._msg = None
        self._quit = False
        self._drain = True
        self._job = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ model thread side
    def step(self):
        assert not self.paused
        return self._switch()

    def call(self, fn):
        """Run fn() on the group's thread (the group must not be mid-step); its result or error."""
        assert not self.paused
        self._job = fn
        kind, val = self._switch()
        if kind == "error":
            raise val
        return val

    def resume(self):
        assert self.paused
        return self._switch()

    def _switch(self):
        self._go.release()
        self._back.acquire()
        kind, val = self._msg
        self.paused = kind == "submitted"
        return kind, val

    def stop(self, drain: bool = True) -> None:
        """End the thread. With `drain` a paused group first collects its in-flight step (so the
        pipeline's results stay in order); a broken pipeline (a cluster error) is not drained."""
        self._quit, self._drain = True, drain
        self._go.release()
        from k2mlx.engine.threads import join_fully

        join_fully(self._thread, timeout=15)  # it ran compiled code: see threads.py
        self.paused = False
        self.bg = None

    # ------------------------------------------------------------ group thread side
    def _report(self, kind, val=None):
        self._msg = (kind, val)
        self._back.release()

    def _pause(self):
        self._report("submitted")
        self._go.acquire()
        if self._quit:
            raise _Quit

    def _loop(self):
        while True:
            self._go.acquire()
            if self._quit:
                return
            job, self._job = self._job, None
            try:
                self._report("done", job() if job is not None else self._next())
            except _Quit:
                return
            except Exception as e:  # handed to the model thread, which fails the requests
                self._report("error", e)

    def _next(self):
        from k2mlx.mlxlm_adapter import step

        out = step(self.bg)
        for r in out[1]:
            if r.prompt_cache is not None:  # leaves this thread for the prefix cache
                evaluate_cache(r.prompt_cache)
        return out


def evaluate_cache(cache) -> None:
    states = []
    for c in cache:
        try:
            states.append(c.state)
        except Exception:  # a layer cache that never saw a token has no state to evaluate
            pass
    mx.eval(states)
