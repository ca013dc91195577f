"""The MLX-ops reference path: grouped dispatch equals a naive per-token loop over experts."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import BATCHES, EVERY, NONE, D, make_case, make_experts, mlx_lm_switch_glu
from k2mlx.kernels.dispatch import moe_forward
from k2mlx.kernels.reference import dispatch_naive, dispatch_reference, group_pairs, route_reference


@pytest.mark.parametrize("n", BATCHES)
def test_reference_dispatch_equals_naive_loop(experts, n):
    x, inds, w, shared = make_case(n)
    assert (np.array(inds) == EVERY).any(axis=1).all() and not (np.array(inds) == NONE).any()
    got = np.array(dispatch_reference(x, inds, w, experts, shared))
    want = dispatch_naive(x, inds, w, experts, shared)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_reference_dispatch_float_experts_and_no_shared():
    ex = make_experts(seed=1, quantized=False)
    x, inds, w, _ = make_case(7, seed=3)
    got = np.array(dispatch_reference(x[None], inds[None], w[None], ex))  # leading batch dim kept
    assert got.shape == (1, 7, D)
    np.testing.assert_allclose(got[0], dispatch_naive(x, inds, w, ex), rtol=1e-4, atol=2e-5)


def test_group_pairs_is_stable_and_grouped():
    inds = mx.array([[3, 1], [1, 3], [0, 3]], mx.int32)
    order, idx, inv = group_pairs(inds, 4)
    assert np.array(order).tolist() == [4, 1, 2, 0, 3, 5]  # expert 0, 1, 1, 3, 3, 3 in token order
    assert np.array(idx).tolist() == [0, 1, 1, 3, 3, 3]
    assert np.array(order)[np.array(inv)].tolist() == list(range(6))


def test_moe_forward_paths_agree_with_switch_mlp():
    """On this machine every path of moe_forward gives what the plain switch_mlp call gives."""
    sw = mlx_lm_switch_glu()
    x, inds, w, shared = make_case(7, seed=5)
    want = np.array(moe_forward(x, inds, w, sw, shared, path="switch"))
    got = np.array(moe_forward(x, inds, w, sw, shared, path="reference"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(want, dispatch_naive(x, inds, w, sw, shared), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_reference_router_matches_model_route(n_group, topk_group):
    moe = pytest.importorskip("k2mlx.model.moe")
    logits = mx.random.normal((9, 32), key=mx.random.key(n_group))
    bias = mx.random.normal((32,), key=mx.random.key(7)) * 0.2
    a = route_reference(logits, bias, 6, n_group, topk_group, 2.5, True)
    b = moe.route(logits, bias, 6, n_group, topk_group, 2.5, True)
    from kernel_cases import assert_sets_equal

    assert_sets_equal(a[0], a[1], b[0], b[1])


def test_reference_router_restricts_to_best_groups():
    # 4 groups of 8; group 2 holds the best scores, group 0 the next: with topk_group=1 every
    # pick must come from group 2 even though group 0 has single high experts.
    logits = np.full((1, 32), -4.0, np.float32)
    logits[0, 16:24] = np.linspace(1.0, 2.0, 8)
    logits[0, 0] = 3.0
    inds, w = route_reference(mx.array(logits), mx.zeros((32,)), 4, 4, 1, 1.0, True)
    assert set(np.array(inds)[0].tolist()) <= set(range(16, 24))
    np.testing.assert_allclose(np.array(w).sum(), 1.0, rtol=1e-6)
