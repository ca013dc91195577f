"""Engine failures are logged where they happen, with their tracebacks (clients get one line)."""
from __future__ import annotations

import logging

import mlx.core as mx

from k2mlx.engine.request import GenerationRequest, SamplingParams
from k2mlx.errors import ClusterError
from k2mlx.events import Done


def _engine(tiny_checkpoint):
    from k2mlx import load
    from k2mlx.engine import Engine

    return Engine(*load(tiny_checkpoint), max_batch=2, cache_bytes=0)


def _req(n=4):
    return GenerationRequest(prompt="hello there", max_tokens=n, sampling=SamplingParams(temperature=0))


def test_a_failing_model_step_is_logged_with_its_traceback(tiny_checkpoint, caplog):
    eng = _engine(tiny_checkpoint)
    try:
        # a broken weight (wrong shape) makes the real forward pass raise inside the batch step
        attn = eng.model.model.layers[0].self_attn
        name = next(k for k in ("q_proj", "q_a_proj") if hasattr(attn, k))
        getattr(attn, name).weight = mx.zeros((3, 5))
        with caplog.at_level(logging.ERROR, logger="k2mlx.engine"):
            done = [e for e in eng.generate(_req()) if isinstance(e, Done)][0]
    finally:
        eng.close()
    assert done.finish_reason == "error" and "\n" not in (done.error or "")
    recs = [r for r in caplog.records if r.name == "k2mlx.engine" and r.exc_info]
    assert recs and "model step failed" in recs[0].getMessage()
    assert recs[0].exc_info[2] is not None  # the traceback, not only the message


def test_a_failure_handed_in_is_logged_with_its_traceback(tiny_checkpoint, caplog):
    eng = _engine(tiny_checkpoint)
    try:
        stream = eng.generate(_req(200))
        next(stream)  # decoding
        try:
            raise ClusterError("rank 1 stopped answering", rank=1)
        except ClusterError as e:
            err = e
        with caplog.at_level(logging.ERROR, logger="k2mlx.engine"):
            eng.fail(err)
            done = [e for e in stream if isinstance(e, Done)][0]
    finally:
        eng.close()
    assert done.finish_reason == "error" and "rank 1 stopped answering" in done.error
    recs = [r for r in caplog.records if r.name == "k2mlx.engine" and r.exc_info]
    assert recs and recs[0].exc_info[1] is err and recs[0].exc_info[2] is not None  # the traceback
