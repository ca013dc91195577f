"""Parity with transformers' DeepseekV3ForCausalLM (PyTorch CPU, float32) on checkpoints saved
in the real K2 layout and in transformers-5's layout, loaded with `k2mlx.loading.load_model`."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import k2mlx
import k2mlx.loading

from .reference import greedy_reference, reference_logits

TOL = 1e-4  # mlx-lm's deepseek_v3 reaches ~5e-7 on such checkpoints; a real mistake is >> 1e-4
CASES = [("k2", "k2"), ("grouped", "k2"), ("k2", "hf"), ("grouped", "hf")]


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {case: k2mlx.loading.load_model(checkpoints[case]) for case in CASES}


def test_real_layout_is_real(checkpoints):
    """The K2-layout fixture really has per-expert keys and top-level rope settings, and the
    transformers one the fused / rope_parameters form, so both code paths are exercised."""
    folder = checkpoints[("k2", "k2")]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and "rope_parameters" not in cfg
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_theta"] == 50000.0
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in names
    assert not any("switch_mlp" in n or "gate_up_proj" in n for n in names)
    hf = checkpoints[("k2", "hf")]
    hf_cfg = json.loads((hf / "config.json").read_text())
    assert "rope_parameters" in hf_cfg
    hf_names = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in hf_names)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c) if isinstance(c, tuple) else c)
def test_prefill_logits_every_position(case, loaded, references, prompt):
    ref = reference_logits(references[case[0]], prompt)  # [L, V]
    out = np.array(loaded[case](mx.array([prompt])))[0]
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err < TOL, f"max abs error {err:.3g}"


@pytest.mark.parametrize("name", ["k2", "grouped"])
def test_decode_through_cache(name, loaded, references, prompt):
    """Prefill 5 tokens, then one token at a time through the latent cache (absorbed form)."""
    model = loaded[(name, "k2")]
    ref = reference_logits(references[name], prompt)
    cache = model.make_cache()
    steps = [np.array(model(mx.array([prompt[:5]]), cache))[0]]
    for t in prompt[5:]:
        steps.append(np.array(model(mx.array([[t]]), cache))[0])
    out = np.concatenate(steps)
    err = np.abs(out - ref).max()
    assert err < TOL, f"max abs error {err:.3g}"
    assert cache[0].offset == len(prompt)


@pytest.mark.parametrize("name", ["k2", "grouped"])
def test_greedy_32_tokens_identical(name, loaded, references, prompt):
    want = greedy_reference(references[name], prompt[:12], 32)
    model = loaded[(name, "k2")]
    cache = model.make_cache()
    logits = model(mx.array([prompt[:12]]), cache)
    got = []
    for _ in range(32):
        tok = int(mx.argmax(logits[0, -1]))
        got.append(tok)
        logits = model(mx.array([[tok]]), cache)
    assert got == want


def test_batched_cache_left_padding(loaded, prompt):
    """mlx-lm BatchKVCache (left padding, per-sequence offsets): each row equals its own run."""
    from mlx_lm.models.cache import BatchKVCache

    model = loaded[("k2", "k2")]
    a, b = prompt[:9], prompt[20:25]
    pad = len(a) - len(b)
    cache = [BatchKVCache([0, pad]) for _ in model.layers]
    tokens = mx.array([a, [0] * pad + b])
    first = model(tokens, cache)
    nxt = mx.array([[prompt[30]], [prompt[31]]])
    second = model(nxt, cache)
    for row, seq, tok in ((0, a, prompt[30]), (1, b, prompt[31])):
        solo = model(mx.array([seq + [tok]]))
        np.testing.assert_allclose(np.array(first[row, -1]), np.array(solo[0, -2]), atol=TOL)
        np.testing.assert_allclose(np.array(second[row, -1]), np.array(solo[0, -1]), atol=TOL)


def test_pipeline_stages_equal_full_model(checkpoints, loaded, prompt):
    folder = checkpoints[("grouped", "k2")]
    first = k2mlx.loading.load_model(folder, layers=range(0, 2))
    last = k2mlx.loading.load_model(folder, layers=range(2, 4))
    assert first.layer_range == range(0, 2) and last.layer_range == range(2, 4)
    c1, c2 = first.make_cache(), last.make_cache()
    x = mx.array([prompt[:10]])
    logits = last.head(last.forward_layers(first.forward_layers(first.embed(x), c1), c2))
    full = loaded[("grouped", "k2")](x)
    np.testing.assert_allclose(np.array(logits), np.array(full), atol=TOL)
    # and one decode step through both stages' caches
    y = mx.array([[prompt[10]]])
    step = last.head(last.forward_layers(first.forward_layers(first.embed(y), c1), c2))
    full2 = loaded[("grouped", "k2")](mx.array([prompt[:11]]))
    np.testing.assert_allclose(np.array(step[0, -1]), np.array(full2[0, -1]), atol=TOL)
