"""`convert`: any source format -> a sharded MLX checkpoint that loads to the expected model."""
from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import k2mlx
import k2mlx.loading
from k2mlx.cli import main as cli_main
from k2mlx.loading.convert import convert
from k2mlx.loading.formats.mlx import module_params

TOL_EXACT = 1e-5  # float32 paths (INT4 kept native, FP8 dequantized exactly)


@pytest.fixture(scope="module")
def converted(bf16_case, confident_case, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for bits in (8, 4):
        out[("bf16", bits)] = convert(bf16_case[0], root / f"bf16-{bits}", bits=bits, group_size=32,
                                      progress=False, shard_bytes=200_000).out
        out[("confident", bits)] = convert(confident_case, root / f"confident-{bits}", bits=bits,
                                           group_size=64, progress=False).out
    return out


def _logits(model, tokens):
    return np.array(model(mx.array([tokens])).astype(mx.float32))[0]


def _greedy(model, prompt, n):
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]))
        out.append(tok)
        logits = model(mx.array([[tok]]), cache)
    return out


def test_output_layout(converted, bf16_case):
    out = converted[("bf16", 4)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert cfg["model_type"] == "kimi_k2" and "quantization_config" not in cfg
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1, "a 200 kB shard limit must give several shards"
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert index["metadata"]["total_size"] == sum(
        sum(np.prod(v["shape"]) * {"U32": 4, "BF16": 2, "F32": 4}[v["dtype"]] for v in
            _header(out / f).values()) for f in files)
    names = index["weight_map"]
    assert "model.layers.1.mlp.switch_mlp.down_proj.scales" in names  # experts stacked
    assert not any(".experts." in n for n in names)
    for side in ("tokenizer_config.json", "chat_template.jinja"):
        assert (out / side).read_text() == (bf16_case[0] / side).read_text()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def _header(path):
    from k2mlx.loading.shards import read_header

    return read_header(path)


def test_convert_equals_in_memory_quantization(converted, bf16_case):
    """Converting streams tensor by tensor but must give exactly what quantizing the loaded
    bf16 model in memory gives (mlx-lm's way): same words, scales and biases."""
    model = k2mlx.loading.load_model(bf16_case[0], dtype="bfloat16")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    want = dict(tree_flatten(model.parameters()))
    got = {}
    out = converted[("bf16", 4)]
    for f in out.glob("*.safetensors"):
        got.update(mx.load(str(f)))
    assert set(got) == set(want)
    for k, v in want.items():
        if "e_score_correction_bias" in k:  # convert stores the router bias in float32
            assert got[k].dtype == mx.float32 and mx.array_equal(got[k], v.astype(mx.float32)).item()
            continue
        assert got[k].dtype == v.dtype and mx.array_equal(got[k], v).item(), k


def _relative_quant_error(w: np.ndarray, bits: int, group: int) -> float:
    q = mx.quantize(mx.array(w), group, bits)
    back = np.array(mx.dequantize(*q, group_size=group, bits=bits))
    return float(np.linalg.norm(back - w) / np.linalg.norm(w))


@pytest.mark.parametrize("bits", [8, 4])
def test_logits_within_derived_tolerance(bits, converted, bf16_case, prompt_tokens):
    """Tolerance, derived rather than picked: each quantized matrix perturbs its product by
    its relative error e (measured here on the source weights); independent perturbations of
    the ~N matmuls a token passes through add in quadrature, so the logits move by about
    sqrt(N) * rms(e) relative to their norm. We allow twice that for the median position
    (a position whose expert choice flips moves more: that is the MoE, not the format)."""
    src = k2mlx.loading.load_model(bf16_case[0], dtype="float32")
    model = k2mlx.loading.load_model(converted[("bf16", bits)], dtype="float32")
    errs = [_relative_quant_error(np.array(v), bits, 32) for k, v in tree_flatten(src.parameters())
            if k.endswith("proj.weight") and v.ndim == 2 and "switch_mlp" not in k]
    n_matmuls = 2 + 7 * src.args.num_hidden_layers  # embed, head; q_a, q_b, kv_a, kv_b, o, up/gate, down
    expected = math.sqrt(n_matmuls) * float(np.sqrt(np.mean(np.square(errs))))
    a, b = _logits(src, prompt_tokens), _logits(model, prompt_tokens)
    rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
    assert np.median(rel) < 2 * expected, f"median {np.median(rel):.4f} vs expected {expected:.4f}"
    assert rel.min() > 0  # it really is quantized
    if bits == 8:
        assert expected < 0.05  # and 8-bit is close in absolute terms


def test_greedy_8bit_equals_source(converted, confident_case):
    src = k2mlx.loading.load_model(confident_case, dtype="float32")
    q8 = k2mlx.loading.load_model(converted[("confident", 8)], dtype="float32")
    assert q8.model.layers[1].mlp.switch_mlp.gate_proj.bits == 8
    rs = np.random.RandomState(11)
    for _ in range(6):
        prompt = [int(t) for t in rs.randint(0, src.args.vocab_size, 12)]
        assert _greedy(q8, prompt, 16) == _greedy(src, prompt, 16)


def test_int4_kept_native(int4_case, ref, prompt_tokens, tmp_path):
    """INT4 -> MLX with experts at 4 bits: the packed words are copied, not requantized (group 32
    recorded per module), the rest kept float: logits still match the reference to 1e-5."""
    folder, reference = int4_case
    out = convert(folder, tmp_path / "int4-mlx", bits=16, class_bits={"experts": 4}, dtype="bfloat16",
                  progress=False).out
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert module_params(q, "model.layers.1.mlp.switch_mlp.up_proj") == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert module_params(q, "model.layers.1.self_attn.o_proj") is None  # kept float
    src_words = mx.load(str(folder / "model-layer02.safetensors"))
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(mx.load(str(f)))
    for e in (0, 15):
        want = src_words[f"model.layers.2.mlp.experts.{e}.up_proj.weight_packed"].view(mx.uint32)
        assert mx.array_equal(got["model.layers.2.mlp.switch_mlp.up_proj.weight"][e], want).item()
    model = k2mlx.loading.load_model(out, dtype="float32")
    err = np.abs(_logits(model, prompt_tokens) - ref.reference_logits(reference, prompt_tokens)).max()
    assert err < TOL_EXACT, f"max abs error {err:.3g}"


def test_fp8_convert_exact_and_quantized(fp8_case, ref, prompt_tokens, tmp_path):
    folder, reference = fp8_case
    f32 = convert(folder, tmp_path / "fp8-f32", bits=16, dtype="float32", progress=False).out
    model = k2mlx.loading.load_model(f32)
    err = np.abs(_logits(model, prompt_tokens) - ref.reference_logits(reference, prompt_tokens)).max()
    assert err < TOL_EXACT, f"max abs error {err:.3g}"
    # quantizing on convert == quantizing on load (FP8 -> exact float -> bf16 -> 4-bit)
    q4 = convert(folder, tmp_path / "fp8-q4", bits=4, group_size=32, dtype="bfloat16", progress=False).out
    a = k2mlx.loading.load_model(q4)
    b = k2mlx.loading.load_model(folder, dtype="bfloat16", bits=4, group_size=32)
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert set(pa) == set(pb)
    for k in pa:
        assert mx.array_equal(pa[k], pb[k]).item(), k
    assert b.model.layers[0].self_attn.o_proj.bits == 4


def test_per_class_bits(bf16_case, tmp_path, prompt_tokens, capsys):
    out = convert(bf16_case[0], tmp_path / "mixed", bits=6, group_size=32,
                  class_bits={"experts": 4, "attention": 8, "embed": 16}, progress=False).out
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 6
    assert q["model.layers.2.mlp.switch_mlp.gate_proj"] == {"group_size": 32, "bits": 4}
    assert q["model.layers.0.self_attn.kv_b_proj"] == {"group_size": 32, "bits": 8}
    assert q["model.embed_tokens"] is False
    assert "model.layers.1.mlp.shared_experts.up_proj" not in q  # default bits: no entry
    model = k2mlx.loading.load_model(out, dtype="float32")
    layer = model.model.layers[2]
    assert layer.mlp.switch_mlp.gate_proj.bits == 4 and layer.self_attn.o_proj.bits == 8
    assert layer.mlp.shared_experts.up_proj.bits == 6
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert np.isfinite(_logits(model, prompt_tokens)).all()
    # `plan` on the converted folder counts exactly the bytes it holds (overrides included)
    assert cli_main(["plan", "--model", str(out), "--memory", "1", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["weight_bytes"]
    stored = sum(v.nbytes for f in out.glob("*.safetensors") for v in mx.load(str(f)).values())
    assert planned == stored


def test_cli_convert(bf16_case, tmp_path, capsys):
    dst = tmp_path / "cli-out"
    rc = cli_main(["convert", "--model", str(bf16_case[0]), "--out", str(dst), "--bits", "8",
                   "--group-size", "32", "--expert-bits", "4"])
    assert rc == 0
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["bits"] == 8 and q["model.layers.1.mlp.switch_mlp.down_proj"]["bits"] == 4
    assert cli_main(["convert", "--model", str(bf16_case[0]), "--out", str(dst)]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
