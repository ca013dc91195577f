"""The MoE path decision (k2mlx.kernels.policy): made once at load and kept on each layer,
overrides validated at load, a probe result cached under $K2MLX_CACHE keyed by machine and
shape (a corrupt cache is ignored with a warning), and a kernel that fails at its first call
replaced in its layer by the switch path with one warning.

On this CPU the kernels' role is played by their C++ twin (backend "cpp"): the same kernel
bodies, run through the same launch code, which lets the probe, the cache and the fallback run
for real here. On a Mac the same code runs with backend "metal" (see test_gpu.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from k2mlx import load
from k2mlx.errors import K2Error
from k2mlx.kernels import cpp, dispatch, policy, probe
from k2mlx.kernels.launch import gpu_backend
from k2mlx.loading.resolve import embedded_model_path

NANO = embedded_model_path()  # 4-bit group 32, hidden 192, 8 experts of 128, top-2, 3 MoE layers
TOKENS = mx.array([[5, 17, 42, 99, 7, 3]])
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the C++ twin")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty K2MLX_CACHE, no K2MLX_MOE_PATH, nothing decided yet in this process."""
    monkeypatch.setenv("K2MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("K2MLX_MOE_PATH", raising=False)
    monkeypatch.setattr(policy, "_decided", {})
    return tmp_path / "cache"


def plans(model):
    return [m.plan for _, m in policy.moe_layers(model)]


def test_default_is_decided_once_at_load(fresh, monkeypatch):
    model, _ = load(NANO)
    ps = plans(model)
    assert sorted(p.name for p in ps) == [f"model.layers.{i}.mlp" for i in (1, 2, 3)]
    (d,) = model.moe_plan.decisions
    if gpu_backend() is None:
        assert d.source == "cpu" and all((p.experts, p.router) == ("switch", "compiled") for p in ps)
    else:
        assert d.source in ("measured", "cache")
    before = np.array(model(TOKENS))
    # the forward pass reads the plan, not the environment (it used to read K2MLX_MOE_PATH
    # on every call, so this raised mid-generation)
    monkeypatch.setenv("K2MLX_MOE_PATH", "bogus")
    np.testing.assert_array_equal(np.array(model(TOKENS)), before)


def test_override_by_argument_and_environment(fresh, monkeypatch):
    switch, _ = load(NANO, moe_path="switch")
    monkeypatch.setenv("K2MLX_MOE_PATH", "reference")
    ref, _ = load(NANO)
    assert {(p.experts, p.router) for p in plans(ref)} == {("reference", "compiled")}
    assert ref.moe_plan.decisions[0].source == "override"
    again, _ = load(NANO, moe_path="switch")  # the argument wins over the environment
    assert {p.experts for p in plans(again)} == {"switch"}
    np.testing.assert_allclose(np.array(ref(TOKENS)), np.array(switch(TOKENS)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["env", "arg"])
def test_a_bad_path_is_a_one_line_error_at_load(fresh, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("K2MLX_MOE_PATH", "fast")
        kw, name = {}, "K2MLX_MOE_PATH"
    else:
        kw, name = {"moe_path": "fast"}, "moe_path"
    with pytest.raises(K2Error) as e:
        load(NANO, **kw)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "auto, switch, reference, kernel" in msg and "'fast'" in msg


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_cli_flag_overrides_for_every_load(fresh, monkeypatch, tmp_path, where):
    # (a bad K2MLX_MOE_PATH in `generate`: tests/test_cli_ux.py)
    from k2mlx.cli import main

    monkeypatch.setenv("K2MLX_MOE_PATH", "auto")  # restored after the test; main sets it
    out = tmp_path / "r.json"
    rest = ["--only", "moe-path", "--json", str(out)]
    argv = (["--moe-path", "reference", "selftest", *rest] if where == "before"
            else ["selftest", "--moe-path", "reference", *rest])
    assert main(argv) == 0
    (r,) = json.loads(out.read_text())
    assert "asked reference" in r["detail"] and "experts reference" in r["detail"], r


@pytest.mark.skipif(gpu_backend() is not None, reason="the kernels can run here")
def test_forcing_the_kernels_on_the_cpu_is_refused_at_load(fresh):
    with pytest.raises(K2Error, match="needs Metal or CUDA"):
        load(NANO, moe_path="kernel")


def _moe(hidden=64, inter=64, experts=16, group_size=32, bits=4, dtype=mx.float32, seed=0):
    import mlx.nn as nn

    from k2mlx.config import ModelArgs
    from k2mlx.model.moe import MoE

    args = ModelArgs(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8, moe_intermediate_size=inter, n_routed_experts=experts,
                     num_experts_per_tok=4, n_group=1, topk_group=1)
    mx.random.seed(seed)
    moe = MoE(args)
    moe.set_dtype(dtype)
    nn.quantize(moe.switch_mlp, group_size=group_size, bits=bits)
    return moe


def test_cache_key_names_chip_os_mlx_and_shape():
    key = json.loads(policy.cache_key("metal", policy.shape_of(_moe())))
    assert key["mlx"] == mx.__version__ and key["backend"] == "metal"
    assert key["chip"] == policy.chip() and key["os"] == policy.os_name() and key["kernels"]
    assert (key["dtype"], key["bits"], key["group_size"], key["experts"], key["hidden"],
            key["expert_size"], key["top_k"]) == ("float32", 4, 32, 16, 64, 64, 4)
    base = policy.cache_key("metal", policy.shape_of(_moe()))
    assert base == policy.cache_key("metal", policy.shape_of(_moe(seed=1)))  # same shape, same key
    for other in (_moe(group_size=64), _moe(bits=8), _moe(dtype=mx.bfloat16), _moe(inter=128),
                  _moe(experts=32)):
        assert policy.cache_key("metal", policy.shape_of(other)) != base
    assert policy.cache_key("cuda", policy.shape_of(_moe())) != base


def test_decision_rules():
    ok_agree = {1: {"kernel": 1e-6, "switch": 1e-6}, 4: {"kernel": 2e-6, "switch": 1e-6}}
    fast = {1: {"kernel": 0.5, "switch": 1.0}, 4: {"kernel": 0.9, "switch": 1.0}, 16: {"kernel": 1, "switch": 2}}
    m = {"dtype": "float32", "agree": ok_agree, "ms": fast}
    assert probe.decide_experts(m)[0]
    slow16 = {**fast, 16: {"kernel": 1.99, "switch": 2.0}}  # within 3%: not "faster"
    assert not probe.decide_experts({**m, "ms": slow16})[0]
    bad = {**ok_agree, 4: {"kernel": 5e-3, "switch": 1e-6}}
    use, why = probe.decide_experts({**m, "agree": bad})
    assert not use and "disagree at 4 tokens" in why
    # in bf16 MLX's own path errs too: the kernels may err as much, or up to the dtype's floor
    bf = {"dtype": "bfloat16", "ms": fast, "agree": {1: {"kernel": 0.015, "switch": 0.001}}}
    assert probe.decide_experts(bf)[0]
    assert not probe.decide_experts({**bf, "agree": {1: {"kernel": 0.05, "switch": 0.02}}})[0]
    assert probe.decide_experts({"error": "RuntimeError: x", "dtype": "float32"}) == (False, "the kernels failed: RuntimeError: x")


@needs_gxx
def test_probe_result_is_cached_and_read_back(fresh):
    model, _ = load(NANO)  # on the CPU: switch, no probe
    (_, moe), *_ = policy.moe_layers(model)
    d = policy.measured_decision(moe, "cpp", budget_s=0.5, timed=(1, 4))  # the twin is slow
    assert d.source == "measured" and d.experts in ("switch", "kernel"), d
    assert "kernels faster" in d.reason or "kernels not faster" in d.reason, d.reason  # agreed
    data = json.loads((fresh / policy.CACHE_FILE).read_text())
    assert data["format"] == policy.CACHE_FORMAT and list(data["entries"]) == [d.key]
    entry = data["entries"][d.key]
    assert set(entry["measured"]["experts"]["ms"]) == {"1", "4"}
    # written atomically: no temp file left beside it (cpp-kernels: the twin's libraries)
    assert sorted(set(os.listdir(fresh)) - {"cpp-kernels"}) == [policy.CACHE_FILE]
    policy._decided.clear()  # a new process: read from the file
    d2 = policy.measured_decision(moe, "cpp")
    assert (d2.source, d2.experts, d2.router, d2.reason) == ("cache", d.experts, d.router, d.reason)
    # configure applies the one cached decision to every layer of that shape
    plan = policy.configure(model, "auto", backend="cpp")
    (d3,) = plan.decisions
    assert d3.source == "cache" and len(d3.layers) == 3
    assert {(p.experts, p.router) for p in plans(model)} == {(d.experts, d.router)}


@needs_gxx
@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "entries": []}), "dir",
                                     "bad-entry"])
def test_a_corrupt_cache_is_ignored_with_a_warning(fresh, caplog, content):
    moe = _moe()
    f = fresh / policy.CACHE_FILE
    fresh.mkdir(exist_ok=True)
    key = policy.cache_key("cpp", policy.shape_of(moe))
    if content == "dir":
        f.mkdir()
    elif content == "bad-entry":  # a planted choice that is not one of ours
        f.write_text(json.dumps({"format": 1, "entries": {key: {"experts": "rm -rf ~", "router": "x",
                                                                "reason": "planted"}}}))
    else:
        f.write_text(content)
    with caplog.at_level(logging.WARNING, logger="k2mlx.kernels.policy"):
        d = policy.measured_decision(moe, "cpp", budget_s=0.3, timed=(1,))
    assert d.source == "measured" and d.experts in ("switch", "kernel")
    assert any("ignoring" in r.getMessage() and "MoE-path cache" in r.getMessage() for r in caplog.records)
    if content != "dir":  # rewritten whole and valid
        assert json.loads(f.read_text())["entries"][key]["experts"] == d.experts


def _kernel_model(monkeypatch, tmp_path, working: bool):
    """k2-nano with every MoE layer forced onto the kernels, run by the C++ twin. Without
    `working`, the twin's compiler is `false`: every kernel fails at its first call, the way
    a Metal compile error would."""
    monkeypatch.setattr(cpp, "_LIBS", {})  # no library built earlier in this process
    monkeypatch.setenv("K2MLX_KERNEL_CACHE", str(tmp_path / ("kc" if working else "kc-broken")))
    if not working:
        monkeypatch.setenv("CXX", "false")
    model, _ = load(NANO)
    policy.configure(model, "kernel", backend="cpp")
    assert {(p.experts, p.router, p.backend) for p in plans(model)} == {("kernel", "kernel", "cpp")}
    return model


@needs_gxx
def test_a_kernel_failing_at_its_first_call_falls_back_with_one_warning(fresh, tmp_path, monkeypatch, caplog):
    want = np.array(load(NANO, moe_path="switch")[0](TOKENS))
    model = _kernel_model(monkeypatch, tmp_path, working=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="k2mlx.kernels.dispatch"):
        got = np.array(model(TOKENS))  # 3 layers, each with a failing router and expert kernel
        again = np.array(model(TOKENS))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "experts kernel failed at its first call" in w]) == 1, warnings
    assert len([w for w in warnings if "router kernel failed at its first call" in w]) == 1, warnings
    assert len(warnings) == 2, warnings
    assert {(p.experts, p.router) for p in plans(model)} == {("switch", "compiled")}
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, got)


@needs_gxx
def test_the_kernel_path_runs_in_the_model(fresh, tmp_path, monkeypatch, caplog):
    """The control of the test above: the same forced plan with a working twin runs the
    kernels inside the model (and equals switch), up to MAX_KERNEL_TOKENS tokens."""
    switch, _ = load(NANO, moe_path="switch")
    model = _kernel_model(monkeypatch, tmp_path, working=True)
    with caplog.at_level(logging.WARNING, logger="k2mlx.kernels.dispatch"):
        got = np.array(model(TOKENS))
    assert not caplog.records
    assert all(p.experts_ran and p.router_ran and p.experts == "kernel" for p in plans(model))
    np.testing.assert_allclose(got, np.array(switch(TOKENS)), rtol=1e-4, atol=1e-4)
    long = mx.array([list(range(3, 3 + 70))])  # a 70-token prefill takes the switch path
    model2 = _kernel_model(monkeypatch, tmp_path, working=True)
    np.testing.assert_allclose(np.array(model2(long)), np.array(switch(long)), rtol=1e-4, atol=1e-4)
    assert not any(p.experts_ran for p in plans(model2)) and all(p.router_ran for p in plans(model2))
