"""Source formats: INT4 compressed-tensors and FP8 block checkpoints load to the logits of a
transformers reference holding the same weights dequantized; the unit pieces (nibble order,
e4m3 table, ragged blocks) are checked against independent arithmetic."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import k2mlx
import k2mlx.loading
from k2mlx.errors import CheckpointError, ConfigError
from k2mlx.loading.formats import compressed_tensors as ct
from k2mlx.loading.formats import detect, fp8

from .conftest import bf16_round, ct_quantization_config

TOL = 1e-5  # float32 end to end; the bar (mlx-lm's bf16 FP8 path lands ~7e-2 off)


# ---- unit level ----

def test_int4_repack_is_bit_exact_mlx_affine():
    """Codes packed the compressed-tensors way dequantize through MLX's own kernel to
    (code) * scale exactly, for every code, and quantized matmul agrees with the float one."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(16, 64))
    codes[0, :16] = np.arange(-8, 8)  # every value, in order, in the first two words
    # bf16 scales, as in the checkpoints: then code*s - 8*s is exact in float32
    scale = bf16_round(rng.uniform(0.01, 0.1, size=(16, 2)).astype(np.float32))
    packed = ct.pack_numpy(codes)
    assert packed.dtype == np.int32 and packed.shape == (16, 8)
    # lowest nibble first, stored +8: word 0 of row 0 holds codes -8..-1 -> 0..7
    assert packed[0, 0].view(np.uint32) == 0x76543210
    w, s, b = ct.repack(mx.array(packed), mx.array(scale), (16, 64), ct.Scheme())
    deq = np.array(mx.dequantize(w, s, b, group_size=32, bits=4))
    want = codes * np.repeat(scale, 32, axis=1)
    assert np.array_equal(deq, want.astype(np.float32))
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    y = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=4)
    assert np.allclose(np.array(y), np.array(x) @ want.T, atol=1e-5)


def test_int4_shape_mismatch_names_tensor():
    packed = mx.array(ct.pack_numpy(np.zeros((4, 64), int)))
    with pytest.raises(CheckpointError, match="weight_packed") as e:
        ct.repack(packed, mx.zeros((4, 2)), (4, 128), ct.Scheme(), "model.layers.1.mlp.experts.0.up_proj", "x.safetensors")
    assert "x.safetensors" in str(e.value)
    with pytest.raises(CheckpointError, match="weight_scale"):
        ct.repack(packed, mx.zeros((4, 3)), (4, 64), ct.Scheme(), "m", "x.safetensors")


def test_compressed_tensors_config_and_ignore():
    scheme = ct.parse_config({"quantization_config": ct_quantization_config()})
    assert (scheme.bits, scheme.group_size) == (4, 32)
    assert ct.is_ignored("model.layers.3.self_attn.q_a_proj", scheme)
    assert ct.is_ignored("model.layers.0.mlp.down_proj", scheme)
    assert ct.is_ignored("lm_head", scheme)
    assert not ct.is_ignored("model.layers.3.mlp.experts.7.down_proj", scheme)
    bad = ct_quantization_config()
    bad["format"] = "float-quantized"
    with pytest.raises(ConfigError, match="float-quantized"):
        ct.parse_config({"quantization_config": bad})


def test_e4m3_table_matches_torch():
    torch = pytest.importorskip("torch")
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float().numpy()
    got = fp8.E4M3_TABLE
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and nan.sum() == 2
    assert np.array_equal(got[~nan], want[~nan])
    assert np.nanmax(got) == 448.0 and got[1] == 2.0**-9  # top normal, smallest subnormal


@pytest.mark.parametrize("shape", [(128, 256), (200, 130), (7, 300)])
def test_fp8_block_dequant_ragged(shape):
    """Float32 product of exact e4m3 values and the block scale, any shape (ragged edges)."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, size=shape).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes in real weights
    gr, gc = -(-shape[0] // 128), -(-shape[1] // 128)
    scale = rng.uniform(1e-4, 1e-2, size=(gr, gc)).astype(np.float32)
    got = np.array(fp8.dequantize(mx.array(codes), mx.array(scale)))
    # independent arithmetic: per element, its block's scale
    rows = np.arange(shape[0])[:, None] // 128
    cols = np.arange(shape[1])[None, :] // 128
    want = fp8.E4M3_TABLE[codes] * scale[rows, cols]
    assert got.dtype == np.float32 and np.array_equal(got, want)
    with pytest.raises(CheckpointError, match="block scale"):
        fp8.dequantize(mx.array(codes), mx.array(scale[:, :1] if gc > 1 else np.ones((gr, 2), np.float32)),
                       name="model.layers.0.self_attn.o_proj")


def test_e4m3_encoder_round_trip():
    finite = fp8.E4M3_TABLE[~np.isnan(fp8.E4M3_TABLE)]
    codes = fp8.encode_e4m3_numpy(finite)
    assert np.array_equal(fp8.E4M3_TABLE[codes], finite)


def test_detect_formats():
    assert detect({"model_type": "kimi_k2"}).kind == "float"
    assert detect({"quantization_config": ct_quantization_config()}).kind == "compressed-tensors"
    src = detect({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert src.kind == "fp8" and src.block == (128, 128)
    assert detect({"quantization": {"bits": 4, "group_size": 64}}).kind == "mlx"
    # K2.5 nests the text model; quantization stays at the top level
    k25 = {"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2"},
           "quantization_config": ct_quantization_config()}
    assert detect(k25).kind == "compressed-tensors"


# ---- end to end against transformers ----

def _logits(model, tokens):
    return np.array(model(mx.array([tokens])).astype(mx.float32))[0]


def test_int4_checkpoint_matches_reference(int4_case, ref, prompt_tokens):
    folder, reference = int4_case
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in names  # the real layout
    model = k2mlx.loading.load_model(folder, dtype="float32")
    sw = model.model.layers[1].mlp.switch_mlp.down_proj
    assert (sw.bits, sw.group_size) == (4, 32) and sw["weight"].dtype == mx.uint32
    # not requantized: the packed words are the file's words
    packed = mx.load(str(folder / names["model.layers.1.mlp.experts.3.down_proj.weight_packed"]))
    words = packed["model.layers.1.mlp.experts.3.down_proj.weight_packed"].view(mx.uint32)
    assert mx.array_equal(sw["weight"][3], words).item()
    assert not hasattr(model.model.layers[1].self_attn.o_proj, "bits")  # the rest stays float
    want = ref.reference_logits(reference, prompt_tokens)
    err = np.abs(_logits(model, prompt_tokens) - want).max()
    assert err < TOL, f"max abs error {err:.3g}"


def test_fp8_checkpoint_matches_reference(fp8_case, ref, prompt_tokens):
    folder, reference = fp8_case
    model = k2mlx.loading.load_model(folder, dtype="float32")
    want = ref.reference_logits(reference, prompt_tokens)
    err = np.abs(_logits(model, prompt_tokens) - want).max()
    assert err < TOL, f"max abs error {err:.3g}"


def test_k25_nested_int4_loads_and_converts(k25_int4_case, ref, prompt_tokens, tmp_path):
    from k2mlx.loading.convert import convert

    folder, reference = k25_int4_case
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(n.startswith("language_model.") for n in names)
    model = k2mlx.loading.load_model(folder, dtype="float32")
    want = ref.reference_logits(reference, prompt_tokens)
    assert np.abs(_logits(model, prompt_tokens) - want).max() < TOL
    out = convert(folder, tmp_path / "k25-mlx", bits=16, class_bits={"experts": 4}, progress=False).out
    converted = k2mlx.loading.load_model(out, dtype="float32")
    assert np.abs(_logits(converted, prompt_tokens) - want).max() < TOL
