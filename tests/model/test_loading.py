"""Loader behaviour: quantized checkpoints, per-layer shard selection, sanitize, clear errors."""
from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import k2mlx
import k2mlx.loading
from k2mlx.config import ModelArgs
from k2mlx.errors import CheckpointError, ConfigError
from k2mlx.loading import load_model
from k2mlx.loading.sanitize import sanitize
from k2mlx.model.k2 import Model

from .reference import K2_TINY, k2_config_json

QUANT = {"group_size": 32, "bits": 4, "lm_head": {"group_size": 64, "bits": 8}}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def float_model(k2_folder):
    return k2mlx.loading.load_model(k2_folder)


@pytest.fixture(scope="module")
def quantized_folder(float_model, k2_folder, tmp_path_factory):
    """An MLX-style 4-bit checkpoint (lm_head 8-bit by a per-module override)."""
    args = float_model.args
    q = Model(args)
    q.update(float_model.parameters())

    def pred(p, m):
        return QUANT.get(p, True) if hasattr(m, "to_quantized") else False

    nn.quantize(q, group_size=32, bits=4, class_predicate=pred)
    folder = tmp_path_factory.mktemp("q4")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(q.parameters())))
    cfg = json.loads((k2_folder / "config.json").read_text())
    cfg["quantization"] = QUANT
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _dequantized_model(qmodel):
    """A float model holding exactly the dequantized weights of `qmodel`."""
    params = dict(tree_flatten(qmodel.parameters()))
    out = {}
    for k, v in params.items():
        if k.endswith((".scales", ".biases")):
            continue
        base = k[: -len(".weight")]
        if v.dtype == mx.uint32:
            gs, bits = (64, 8) if base == "lm_head" else (32, 4)
            v = mx.dequantize(v, params[base + ".scales"], params[base + ".biases"], gs, bits)
        out[k] = v
    f = Model(qmodel.args)
    f.load_weights(list(out.items()), strict=True)
    return f


def test_quantized_checkpoint_matches_dequantized(quantized_folder, prompt):
    q = k2mlx.loading.load_model(quantized_folder)
    assert q.model.layers[1].mlp.switch_mlp.gate_proj.weight.dtype == mx.uint32
    assert q.model.layers[1].self_attn.kv_b_proj.weight.dtype == mx.uint32
    assert q.lm_head.bits == 8 and q.lm_head.group_size == 64
    f = _dequantized_model(q)
    x = mx.array([prompt[:24]])
    np.testing.assert_allclose(np.array(q(x)), np.array(f(x)), atol=1e-4)
    cq, cf = q.make_cache(), f.make_cache()
    q(x, cq), f(x, cf)
    for t in prompt[24:30]:
        a, b = q(mx.array([[t]]), cq), f(mx.array([[t]]), cf)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_bfloat16_dtype_keeps_router_bias_float32(k2_folder, prompt):
    m = load_model(k2_folder, dtype=mx.bfloat16)
    assert m.model.layers[1].self_attn.q_a_proj.weight.dtype == mx.bfloat16
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == mx.float32
    assert m(mx.array([prompt[:8]])).shape == (1, 8, K2_TINY["vocab_size"])


def test_stage_reads_only_its_shards(k2_folder, tmp_path, prompt):
    """Shards are split by layer (embed + layer 0 | layer 1 | layer 2 + norm + head): the first
    stage loads with the other shards deleted; the full model then names the missing file."""
    folder = _copy(k2_folder, tmp_path / "ck")
    (folder / "model-00002-of-00003.safetensors").unlink()
    (folder / "model-00003-of-00003.safetensors").unlink()
    stage = load_model(folder, layers=range(0, 1))
    assert stage.layer_range == range(0, 1)
    assert stage.embed(mx.array([prompt[:3]])).shape == (1, 3, K2_TINY["hidden_size"])
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "model-00002-of-00003.safetensors" in str(e.value)


def test_sanitize_is_pure_and_drops_mtp_and_rotary(k2_folder):
    from k2mlx.loading.checkpoint import read_tensors, tensor_index

    index = tensor_index(k2_folder)
    raw = read_tensors(k2_folder, index, list(index))
    before = set(raw)
    args = ModelArgs.from_dict(json.loads((k2_folder / "config.json").read_text()))
    out = sanitize(raw, args)
    assert set(raw) == before  # input untouched
    n = K2_TINY["num_hidden_layers"]
    assert not any(k.startswith(f"model.layers.{n}.") or "rotary_emb" in k for k in out)
    w = out["model.layers.1.mlp.switch_mlp.up_proj.weight"]
    E, inter, hid = K2_TINY["n_routed_experts"], K2_TINY["moe_intermediate_size"], K2_TINY["hidden_size"]
    assert w.shape == (E, inter, hid)
    np.testing.assert_array_equal(np.array(w[5]), np.array(raw["model.layers.1.mlp.experts.5.up_proj.weight"]))


def test_fused_gate_up_split_gate_rows_first():
    args = ModelArgs.from_dict(k2_config_json(K2_TINY))
    E, I, H = K2_TINY["n_routed_experts"], K2_TINY["moe_intermediate_size"], K2_TINY["hidden_size"]
    fused = mx.arange(E * 2 * I * H, dtype=mx.float32).reshape(E, 2 * I, H)
    out = sanitize({"model.layers.1.mlp.experts.gate_up_proj": fused,
                    "model.layers.1.mlp.experts.down_proj": mx.zeros((E, H, I))}, args)
    np.testing.assert_array_equal(np.array(out["model.layers.1.mlp.switch_mlp.gate_proj.weight"]),
                                  np.array(fused[:, :I]))
    np.testing.assert_array_equal(np.array(out["model.layers.1.mlp.switch_mlp.up_proj.weight"]),
                                  np.array(fused[:, I:]))
    assert out["model.layers.1.mlp.switch_mlp.down_proj.weight"].shape == (E, H, I)


# ---- errors name the key / tensor / file ----

def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_config_key_is_named(k2_folder, tmp_path):
    folder = _copy(k2_folder, tmp_path / "ck")
    _edit_config(folder, lambda c: c.pop("kv_lora_rank"))
    with pytest.raises(ConfigError) as e:
        k2mlx.loading.load_model(folder)
    assert "kv_lora_rank" in str(e.value) and e.value.key == "kv_lora_rank"


def test_unknown_model_type_is_named(k2_folder, tmp_path):
    folder = _copy(k2_folder, tmp_path / "ck")
    _edit_config(folder, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConfigError) as e:
        k2mlx.loading.load_model(folder)
    assert "llama" in str(e.value) and e.value.key == "model_type"


def test_bad_shape_names_tensor_and_file(k2_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(k2_folder, tmp_path / "ck")
    shard = folder / "model-00002-of-00003.safetensors"
    t = load_file(str(shard))
    t["model.layers.1.self_attn.kv_b_proj.weight"] = np.zeros((3, 5), np.float32)
    save_file(t, str(shard))
    with pytest.raises(CheckpointError) as e:
        k2mlx.loading.load_model(folder)
    msg = str(e.value)
    assert "model.layers.1.self_attn.kv_b_proj.weight" in msg and shard.name in msg
    assert "[3, 5]" in msg


def test_missing_tensor_names_it(k2_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(k2_folder, tmp_path / "ck")
    shard = folder / "model-00003-of-00003.safetensors"
    t = load_file(str(shard))
    del t["model.layers.2.post_attention_layernorm.weight"]
    save_file(t, str(shard))
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.2.post_attention_layernorm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        k2mlx.loading.load_model(folder)
    assert "model.layers.2.post_attention_layernorm.weight" in str(e.value)
    # a missing expert names the expert tensor
    shard2 = folder / "model-00002-of-00003.safetensors"
    t = load_file(str(shard2))
    del t["model.layers.1.mlp.experts.7.gate_proj.weight"]
    save_file(t, str(shard2))
    del idx["weight_map"]["model.layers.1.mlp.experts.7.gate_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        k2mlx.loading.load_model(folder)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in str(e.value)


def test_corrupt_shard_names_file(k2_folder, tmp_path):
    folder = _copy(k2_folder, tmp_path / "ck")
    shard = folder / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        k2mlx.loading.load_model(folder)
    assert shard.name in str(e.value)


def test_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        k2mlx.loading.load_model(tmp_path / "nope")


def test_load_without_tokenizer_names_the_file(k2_folder):
    """k2mlx.load needs a tokenizer: its absence is a CheckpointError naming tiktoken.model
    (it used to return None, and generate / serve failed later); load_model needs none."""
    assert not (k2_folder / "tiktoken.model").exists()
    with pytest.raises(CheckpointError, match="tiktoken.model") as e:
        k2mlx.load(k2_folder)
    assert e.value.file == str(k2_folder / "tiktoken.model")
    assert k2mlx.loading.load_model(k2_folder) is not None
