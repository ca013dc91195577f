"""Cases shared by the kernel tests (built by k2mlx.kernels.checks, which selftest uses too).

A uniquely named module: `from conftest import ...` would pick whichever tests/*/conftest.py
was imported first when the whole suite runs."""
from __future__ import annotations

import numpy as np
from k2mlx.kernels.checks import D, E, EVERY, I, K, NONE, make_case, make_experts  # noqa: F401

BATCHES = (1, 2, 7, 64)


def assert_sets_equal(inds_a, w_a, inds_b, w_b, atol=1e-6):
    """Routings equal up to the order of the k picks: same experts, same weights."""
    ia, ib = np.array(inds_a), np.array(inds_b)
    wa, wb = np.array(w_a, dtype=np.float32), np.array(w_b, dtype=np.float32)
    oa, ob = np.argsort(ia, -1), np.argsort(ib, -1)
    np.testing.assert_array_equal(np.take_along_axis(ia, oa, -1), np.take_along_axis(ib, ob, -1))
    np.testing.assert_allclose(np.take_along_axis(wa, oa, -1), np.take_along_axis(wb, ob, -1),
                               rtol=1e-5, atol=atol)


def mlx_lm_switch_glu(seed=0, bits=4, group_size=32, dims=(E, D, I)):
    """mlx-lm's SwitchGLU, quantized the way a converted checkpoint is."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU

    e, d, i = dims
    mx.random.seed(seed)
    sw = SwitchGLU(d, i, e)
    nn.quantize(sw, group_size=group_size, bits=bits)
    return sw
