"""Each kernel body, compiled through its C++ prelude with g++ (threadgroups run as fibers,
so barriers and SIMD reductions keep their GPU meaning), equals the MLX-ops reference."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from kernel_cases import BATCHES, make_experts
from k2mlx.kernels.checks import compare_dispatch, compare_router, dispatch_stages, make_case

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the C++ twin")


@pytest.mark.parametrize("n", BATCHES)
def test_cpp_dispatch_kernels_equal_reference(experts, n):
    err = compare_dispatch("cpp", n, experts)
    assert err["order"] == err["pos"] == err["slots"] == 0, err
    assert err["h"] < 2e-5 and err["y"] < 2e-5 and err["combine"] < 1e-5, err
    assert err["out"] < 2e-5, err


@pytest.mark.parametrize("bits,group_size", [(8, 64), (2, 32)])
def test_cpp_dispatch_other_quantizations(bits, group_size):
    err = compare_dispatch("cpp", 7, make_experts(seed=2, bits=bits, group_size=group_size), seed=2)
    assert err["slots"] == 0 and err["out"] < 2e-5, err


def test_cpp_dispatch_without_shared_and_unused_slots(experts):
    x, inds, w, _ = make_case(2)
    got = dispatch_stages("cpp", x, inds, w, experts, None)
    P = inds.size
    used = len(np.unique(np.array(inds)))
    assert (got["slots"][used:] == [-1, 0, 0]).all() and (got["slots"][:used, 0] >= 0).all()
    assert got["slots"][:used, 2].sum() == P
    from k2mlx.kernels.reference import dispatch_reference

    np.testing.assert_allclose(got["out"], np.array(dispatch_reference(x, inds, w, experts)),
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "n_experts,top_k,n_group,topk_group",
    [(384, 8, 1, 1), (64, 6, 8, 3), (64, 4, 4, 4), (32, 1, 1, 1)],
    ids=["k2", "grouped", "all-groups", "top1"],
)
def test_cpp_router_equals_reference(n_experts, top_k, n_group, topk_group):
    n = 2 if n_experts > 100 else 7
    bad, werr = compare_router("cpp", n, n_experts, top_k, n_group, topk_group)
    assert bad == 0 and werr < 1e-6


def test_cpp_router_without_renormalization():
    bad, werr = compare_router("cpp", 5, 64, 4, 2, 1, norm=False, rsf=1.5)
    assert bad == 0 and werr < 1e-6


def test_probe_measures_the_twin_at_the_models_own_shapes(experts):
    """The load-time probe runs the kernel bodies (here their C++ twin) on a layer's own
    weights and finds them in agreement with the float32 reference, like the default path."""
    from kernel_cases import mlx_lm_switch_glu
    from k2mlx.kernels.probe import ERROR_FLOOR, measure_experts

    m = measure_experts(mlx_lm_switch_glu(), 4, "cpp", budget_s=0.5, timed=(1, 4))
    assert "error" not in m, m
    assert m["dtype"] == "float32" and set(m["ms"]) == {1, 4}
    for e in m["agree"].values():
        assert e["kernel"] < ERROR_FLOOR["float32"] and e["switch"] < ERROR_FLOOR["float32"], m
