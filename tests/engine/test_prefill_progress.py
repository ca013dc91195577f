"""Prefill progress (k2mlx.events.PrefillProgress): a long prompt reports how far it is after every
prefill chunk, before its first token, when the request asks (`progress=True`); a cached prefix
counts as done."""
from __future__ import annotations

import pytest

from k2mlx.events import Done, PrefillProgress, TextDelta
from k2mlx.engine.request import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from k2mlx import load

    return load(tiny_checkpoint)


def test_progress_per_chunk_before_the_first_token(loaded):
    from k2mlx.engine import Engine

    model, tok = loaded
    prompt = [int(10 + i % 300) for i in range(230)]
    eng = Engine(model, tok, max_batch=2, cache_bytes=1 << 26, prefill_step_size=64)
    try:
        def events():
            r = GenerationRequest(prompt_tokens=prompt, max_tokens=3, parse=False, progress=True,
                                  sampling=SamplingParams(temperature=0.0))
            return list(eng.generate(r))

        first = events()
        prog = [e for e in first if isinstance(e, PrefillProgress)]
        assert [p.done for p in prog] == [64, 128, 192, 229, 230]  # the last token goes in with the first step
        assert all(p.total == 230 for p in prog)
        assert max(i for i, e in enumerate(first) if isinstance(e, PrefillProgress)) < \
            min(i for i, e in enumerate(first) if isinstance(e, (TextDelta, Done)))
        second = events()  # the prefix is cached now: progress starts there
        done = second[-1]
        assert done.usage.cached_tokens > 0
        prog2 = [e for e in second if isinstance(e, PrefillProgress)]
        assert all(p.done > done.usage.cached_tokens - 1 for p in prog2)
        assert eng.prefill_status() == []  # nothing is reading a prompt now
        quiet = list(eng.generate(GenerationRequest(prompt_tokens=prompt[::-1], max_tokens=2, parse=False)))
        assert not [e for e in quiet if isinstance(e, PrefillProgress)]  # only when asked for
    finally:
        eng.close()
