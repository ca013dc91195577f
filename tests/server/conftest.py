"""A real `k2mlx serve` process on the tiny checkpoint, on a free port, shared by the server tests."""
from __future__ import annotations

import pytest
from k2serve_util import start_server, stop_server


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    proc, base = start_server(tiny_checkpoint, "--max-batch", "8")
    yield base
    stop_server(proc)


@pytest.fixture(scope="session")
def no_stop(tiny_tokenizer) -> dict[str, float]:
    """logit_bias banning the stop tokens, so the random tiny model always runs to max_tokens."""
    return {str(t): -100 for t in tiny_tokenizer.eos_token_ids}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """An in-process engine on the tiny checkpoint, one per test module (tests may fail it)."""
    from k2mlx import load
    from k2mlx.engine import Engine

    eng = Engine(*load(tiny_checkpoint), max_batch=2, model_name="k2-tiny")
    yield eng
    eng.close()
