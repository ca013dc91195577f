"""MLX-quantized checkpoints: 2..8 bits, per-module overrides, experts stacked or per expert."""
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
from k2mlx.loading.convert import convert
from k2mlx.loading.formats.mlx import module_class, module_params
from k2mlx.loading.formats.writer import ShardWriter


def _params(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_every_bit_width_round_trips(bits, bf16_case, tmp_path):
    """convert at `bits` -> load == quantizing the bf16 model in memory at `bits`."""
    out = convert(bf16_case[0], tmp_path / f"q{bits}", bits=bits, group_size=32, progress=False).out
    got = k2mlx.loading.load_model(out)
    want = k2mlx.loading.load_model(bf16_case[0], dtype="bfloat16")
    nn.quantize(want, group_size=32, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    assert got.model.layers[1].mlp.switch_mlp.up_proj.bits == bits
    pg, pw = _params(got), _params(want)
    for k, v in pw.items():
        assert mx.array_equal(pg[k].astype(v.dtype), v).item(), k


def test_per_expert_quantized_layout_loads_like_stacked(bf16_case, tmp_path, prompt_tokens):
    """Some MLX conversions keep one quantized triple per expert; loading stacks them."""
    stacked = convert(bf16_case[0], tmp_path / "stacked", bits=4, group_size=32, progress=False).out
    per_expert = tmp_path / "per-expert"
    per_expert.mkdir()
    weights = {}
    for f in stacked.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    writer = ShardWriter(per_expert, shard_bytes=100_000)
    for k, v in weights.items():
        if ".switch_mlp." in k:
            prefix, rest = k.split(".switch_mlp.")
            for e in range(v.shape[0]):
                writer.add(f"{prefix}.experts.{e}.{rest}", v[e])
        else:
            writer.add(k, v)
    writer.finish()
    shutil.copy(stacked / "config.json", per_expert / "config.json")
    names = json.loads((per_expert / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.gate_proj.scales" in names
    a = k2mlx.loading.load_model(stacked, dtype="float32")
    b = k2mlx.loading.load_model(per_expert, dtype="float32")
    x = mx.array([prompt_tokens])
    assert np.array_equal(np.array(a(x)), np.array(b(x)))


def test_module_classes_and_overrides():
    q = {"bits": 4, "group_size": 64, "model.layers.3.self_attn.q_b_proj": {"bits": 8},
         "model.embed_tokens": False}
    assert module_params(q, "model.layers.3.self_attn.q_b_proj") == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert module_params(q, "model.layers.3.self_attn.o_proj") == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert module_params(q, "model.embed_tokens") is None and module_params(None, "x") is None
    assert [module_class(p) for p in (
        "model.layers.3.mlp.switch_mlp.gate_proj", "model.layers.3.mlp.shared_experts.up_proj",
        "model.layers.0.mlp.down_proj", "model.layers.3.self_attn.kv_b_proj", "model.embed_tokens", "lm_head",
    )] == ["experts", "shared", "dense", "attention", "embed", "head"]


def test_requantize_an_mlx_checkpoint(bf16_case, tmp_path, prompt_tokens):
    """MLX 8-bit -> 4-bit: dequantized through MLX, requantized; the config follows."""
    q8 = convert(bf16_case[0], tmp_path / "q8", bits=8, group_size=32, progress=False).out
    q4 = convert(q8, tmp_path / "q4", bits=4, group_size=32, progress=False).out
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    model = k2mlx.loading.load_model(q4, dtype="float32")
    src = k2mlx.loading.load_model(bf16_case[0], dtype="float32")
    assert model.model.layers[2].mlp.switch_mlp.down_proj.bits == 4
    a = np.array(src(mx.array([prompt_tokens])))[0]
    b = np.array(model(mx.array([prompt_tokens])))[0]
    rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
    assert 0 < np.median(rel) < 0.8  # 4-bit on this random model: ~0.4 (see test_convert)
