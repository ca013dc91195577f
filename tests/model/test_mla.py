"""MLA: absorbed vs expanded attention, the latent cache's size, YaRN against transformers."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import k2mlx
import k2mlx.loading
from k2mlx.config import ModelArgs
from k2mlx.model.k2 import Model

from .reference import GROUPED_TINY, K2_TINY, hf_config, k2_config_json


@pytest.fixture(scope="module")
def model(k2_folder):
    return k2mlx.loading.load_model(k2_folder)


def _run(model, form, prompt, split=6):
    """Prefill `split` tokens then decode the rest one at a time with a forced form."""
    model.set_attention_form(form)
    try:
        cache = model.make_cache()
        outs = [model(mx.array([prompt[:split]]), cache)]
        for t in prompt[split:]:
            outs.append(model(mx.array([[t]]), cache))
        return np.array(mx.concatenate(outs, axis=1))[0]
    finally:
        model.set_attention_form("auto")


def test_absorbed_equals_expanded(model, prompt):
    absorbed = _run(model, "absorbed", prompt)
    expanded = _run(model, "expanded", prompt)
    assert np.abs(absorbed - expanded).max() < 1e-4
    # also a multi-token chunk on top of a cache, through both forms
    full_a = np.array(_run(model, "absorbed", prompt, split=len(prompt)))
    full_e = np.array(_run(model, "expanded", prompt, split=len(prompt)))
    assert np.abs(full_a - full_e).max() < 1e-4


def test_absorbed_follows_reloaded_kv_b(model, prompt):
    """The cached kv_b halves are rebuilt when kv_b_proj's weight is replaced."""
    attn = model.layers[0].self_attn
    old = attn.kv_b_proj.weight
    try:
        _run(model, "absorbed", prompt[:8])
        attn.kv_b_proj.weight = old * 0.5 + 0.01
        a = _run(model, "absorbed", prompt[:12])
        e = _run(model, "expanded", prompt[:12])
        assert np.abs(a - e).max() < 1e-4
    finally:
        attn.kv_b_proj.weight = old


def test_auto_picks_absorbed_for_decode_and_expanded_for_prefill(model):
    attn = model.layers[0].self_attn
    assert attn.use_absorbed(1, 1000)
    assert attn.use_absorbed(4, 4096)
    assert not attn.use_absorbed(512, 512)
    assert not attn.use_absorbed(1, 1)  # a single token with an empty cache: nothing to save


def test_latent_cache_holds_rank_plus_rope_per_token(model, prompt):
    cache = model.make_cache()
    model(mx.array([prompt[:17]]), cache)
    model(mx.array([[prompt[17]]]), cache)
    T = 18
    per_token = K2_TINY["kv_lora_rank"] + K2_TINY["qk_rope_head_dim"]
    assert len(cache) == K2_TINY["num_hidden_layers"]
    for c in cache:
        keys, values = c.keys_and_values()  # the filled part
        assert c.offset == T
        assert keys.shape == (1, 1, T, K2_TINY["kv_lora_rank"])
        assert values.shape == (1, 1, T, K2_TINY["qk_rope_head_dim"])
        assert (keys.size + values.size) // T == per_token
    # an expanded K/V cache would hold heads * (nope + rope + v) per token
    H = K2_TINY["num_attention_heads"]
    expanded = H * (K2_TINY["qk_nope_head_dim"] + K2_TINY["qk_rope_head_dim"] + K2_TINY["v_head_dim"])
    assert expanded > 4 * per_token


@pytest.mark.parametrize("qmm_no_transpose", [True, False], ids=["qmm", "dequantize-fallback"])
def test_quantized_kv_b_absorbed_matches_dequantized(qmm_no_transpose, monkeypatch):
    """A 4-bit kv_b_proj works in the absorbed form without any re-packing (also through the
    dequantizing fallback used where the backend lacks a transpose=False quantized matmul)."""
    from k2mlx.model import mla

    monkeypatch.setattr(mla, "_has_qmm_no_transpose", lambda: qmm_no_transpose)
    args = ModelArgs.from_dict(k2_config_json(K2_TINY))
    mx.random.seed(3)
    q = Model(args)
    nn.quantize(q, group_size=32, bits=4, class_predicate=lambda p, m: p.endswith("kv_b_proj"))
    f = Model(args)
    params = dict(tree_flatten(q.parameters()))
    deq = {}
    for k, v in params.items():
        if k.endswith("kv_b_proj.weight"):
            base = k[: -len(".weight")]
            deq[k] = mx.dequantize(v, params[base + ".scales"], params[base + ".biases"], 32, 4)
        elif not k.endswith((".scales", ".biases")):
            deq[k] = v
    f.load_weights(list(deq.items()), strict=True)
    tokens = mx.array([[1, 5, 9, 33, 2, 7, 100, 4]])
    for form in ("absorbed", "expanded"):
        q.set_attention_form(form)
        f.set_attention_form(form)
        cq, cf = q.make_cache(), f.make_cache()
        a = mx.concatenate([q(tokens[:, :3], cq)] + [q(tokens[:, i:i + 1], cq) for i in range(3, 8)], 1)
        b = mx.concatenate([f(tokens[:, :3], cf)] + [f(tokens[:, i:i + 1], cf) for i in range(3, 8)], 1)
        assert np.abs(np.array(a) - np.array(b)).max() < 1e-4


@pytest.mark.parametrize("cfg", [K2_TINY, GROUPED_TINY], ids=["k2", "grouped"])
def test_yarn_matches_transformers(cfg):
    """inv_freq, attention factor and softmax scale equal transformers' own computation."""
    torch = pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    from k2mlx.model.rope import rope_parameters, softmax_scale

    hc = hf_config(cfg)
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](hc, torch.device("cpu"))
    args = ModelArgs.from_dict(k2_config_json(cfg))
    inv, factor = rope_parameters(args.qk_rope_head_dim, args.rope_theta, args.rope_scaling,
                                  args.max_position_embeddings)
    np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
    assert factor == pytest.approx(factor_ref, rel=1e-12)
    attn = DeepseekV3Attention(hc, 0)
    assert softmax_scale(args.qk_head_dim, args.rope_scaling) == pytest.approx(attn.scaling, rel=1e-12)
    if cfg is GROUPED_TINY:
        assert factor != 1.0  # mscale != mscale_all_dim: the cos/sin magnitude path is exercised
