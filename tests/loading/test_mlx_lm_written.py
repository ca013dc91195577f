"""Checkpoints written by mlx-lm's own code load in k2mlx and give mlx-lm's logits.

The fixtures are made by running mlx-lm itself (scripts/mlx_lm_checkpoint.py): its
deepseek_v3 / kimi_k25 model built from a tiny K2 config, every parameter randomized (norms and
router correction biases non-zero), quantized with mlx-lm's quantize_model (with per-module
overrides) and saved with mlx-lm's save_model / save_config. The reference is mlx-lm's own
model loaded with mlx-lm's own loader from the same folder.

n_group is 1 (as in every K2 release): mlx-lm's router sets the scores of dropped expert
groups to 0 while k2mlx uses -inf, so with n_group > 1 a token whose kept scores all fall
below 0 could pick a dropped expert in mlx-lm; k2mlx's is the reference behaviour (see
tests/model for grouped routing against transformers), and the parity checked here is the
checkpoint layout, not that difference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import import_file

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mlx_lm_checkpoint.py"
# per-module overrides, as mlx-lm records them: one attention matrix and the head at other bits
OVERRIDES = {"layers.1.self_attn.embed_q": {"bits": 8, "group_size": 32},
             "layers.2.self_attn.unembed_out": {"bits": 2, "group_size": 64},
             "lm_head": {"bits": 6, "group_size": 64}}
TOL = {"float32": 1e-5, "q4": 1e-4}


def writer():
    return import_file(_SCRIPT, "mlx_lm_checkpoint")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{(form, kind): folder} for form kimi_k2 / kimi_k25 and kind float32 / q4."""
    w = writer()
    root = tmp_path_factory.mktemp("mlx-lm-written")
    out = {}
    for form in ("kimi_k2", "kimi_k25"):
        text = w.tiny_k2_config()
        cfg = w.nest_k25(text) if form == "kimi_k25" else text
        out[(form, "float32")] = w.write_mlx_lm_checkpoint(root / f"{form}-f32", cfg, seed=3,
                                                           vision_tensor=form == "kimi_k25")
        out[(form, "q4")] = w.write_mlx_lm_checkpoint(root / f"{form}-q4", cfg, bits=4, group_size=32,
                                                      overrides=OVERRIDES, seed=4, vision_tensor=form == "kimi_k25")
    return out


def mlx_lm_model(folder):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    return model


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


PROMPT = [[5, 17, 250, 99, 7, 200, 31, 2, 8, 9, 10, 11, 300, 3, 4, 44, 6, 7, 88, 9, 12, 2, 3, 140]]  # > 16: YaRN


CASES = [(f, k) for f in ("kimi_k2", "kimi_k25") for k in ("float32", "q4")]


@pytest.mark.parametrize("form,kind", CASES)
def test_prefill_and_decode_logits_equal_mlx_lm(written, form, kind):
    from mlx_lm.models.cache import make_prompt_cache

    from k2mlx.loading import load_model

    folder = written[(form, kind)]
    ref, ours = mlx_lm_model(folder), load_model(folder)
    tokens = mx.array(PROMPT)
    assert rel(ours(tokens), ref(tokens)) <= TOL[kind]
    # decode through both caches (absorbed attention on k2mlx's side, L == 1 in mlx-lm)
    c_ref, c_ours = make_prompt_cache(ref), ours.make_cache()
    a, b = ref(tokens, c_ref)[:, -1], ours(tokens, c_ours)[:, -1]
    for _ in range(6):
        assert rel(b, a) <= TOL[kind]
        nxt = mx.argmax(a, axis=-1)[:, None]
        a, b = ref(nxt, c_ref)[:, -1], ours(nxt, c_ours)[:, -1]
    assert rel(b, a) <= TOL[kind]


def test_stored_mla_matrices_are_used_as_they_are(written):
    """embed_q / unembed_out are loaded with the checkpoint's own codes and settings (the
    per-module overrides included), never dequantized and re-quantized."""
    from k2mlx.loading import load_model
    from k2mlx.model.mla import QuantizedPerHeadLinear

    folder = written[("kimi_k25", "q4")]
    stored = mx.load(str(folder / "model.safetensors"))
    model = load_model(folder)
    for i, name, bits, group in ((0, "embed_q", 4, 32), (1, "embed_q", 8, 32), (2, "unembed_out", 2, 64)):
        m = getattr(model.model.layers[i].self_attn, name)
        assert isinstance(m, QuantizedPerHeadLinear) and (m.bits, m.group_size) == (bits, group)
        key = f"language_model.model.layers.{i}.self_attn.{name}"
        for part in ("weight", "scales", "biases"):
            assert mx.array_equal(getattr(m, part), stored[f"{key}.{part}"]).item(), (key, part)
    assert "kv_b_proj" not in model.model.layers[0].self_attn
    assert (model.lm_head.bits, model.lm_head.group_size) == (6, 64)


@pytest.mark.parametrize("kind", ["float32", "q4"])
def test_absorbed_and_expanded_forms_agree_on_split_weights(written, kind):
    from k2mlx.loading import load_model

    model = load_model(written[("kimi_k2", kind)])
    tokens = mx.array(PROMPT)
    model.set_attention_form("absorbed")
    a = model(tokens)
    model.set_attention_form("expanded")
    b = model(tokens)
    assert rel(a, b) <= TOL[kind]


@pytest.mark.parametrize("form", ["kimi_k2", "kimi_k25"])
def test_pipeline_stages_equal_the_full_model(written, form):
    from k2mlx.loading import load_model

    folder = written[(form, "q4")]
    full = load_model(folder)
    first, last = load_model(folder, layers=range(0, 2)), load_model(folder, layers=range(2, 3))
    assert "lm_head" not in first and "embed_tokens" not in last.model
    tokens = mx.array(PROMPT)
    h = first.forward_layers(first.embed(tokens))
    assert rel(last.head(last.forward_layers(h)), full(tokens)) <= 1e-6


def _tensors(folder) -> dict:
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        out.update({k.removeprefix("language_model."): v for k, v in mx.load(str(f)).items()
                    if not k.startswith("vision_tower.")})
    return out


def test_convert_reads_mlx_lm_checkpoints(written, tmp_path):
    """convert: float32 -> 8-bit quantizes embed_q / unembed_out in their own layout, giving
    exactly the tensors mlx-lm's quantize_model writes from the same floats; 4-bit -> 4-bit keeps
    every stored code and the per-module overrides."""
    from k2mlx.loading import load_model
    from k2mlx.loading.convert import convert

    w = writer()
    src = written[("kimi_k25", "float32")]
    res = convert(src, tmp_path / "q8", bits=8, group_size=32, dtype="float32", progress=False)
    mlx_lm_q8 = w.write_mlx_lm_checkpoint(tmp_path / "mlx-lm-q8", w.nest_k25(w.tiny_k2_config()), bits=8,
                                          group_size=32, seed=3)
    ours, theirs = _tensors(res.out), _tensors(mlx_lm_q8)
    assert sorted(ours) == sorted(theirs) and "model.layers.0.self_attn.embed_q.scales" in ours
    for k in theirs:
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    tokens = mx.array(PROMPT)

    q4 = written[("kimi_k2", "q4")]
    res = convert(q4, tmp_path / "q4", bits=4, group_size=32, dtype="float32", progress=False)
    before, after = _tensors(q4), _tensors(res.out)
    assert sorted(before) == sorted(after)
    for k in ("model.layers.0.self_attn.embed_q", "model.layers.1.self_attn.unembed_out",
              "model.layers.1.mlp.switch_mlp.down_proj", "model.layers.2.mlp.shared_experts.up_proj"):
        for part in (".weight", ".scales", ".biases"):  # 4-bit modules keep their codes as stored
            assert mx.array_equal(before[k + part], after[k + part]).item(), k + part
    # modules stored at other bits are brought to the requested 4 bits (convert's rule)
    assert after["model.layers.1.self_attn.embed_q.weight"].shape[-1] == 32 * 4 // 32
    model = load_model(res.out)
    assert model.model.layers[1].self_attn.embed_q.bits == 4
    assert model(tokens).shape == (1, len(PROMPT[0]), 320)


def test_plan_sizes_an_mlx_lm_checkpoint_exactly(tmp_path):
    """plan's bytes for a bf16 4-bit mlx-lm checkpoint (with per-module overrides) equal the
    bytes of the tensors in its files."""
    from k2mlx.cli import main

    w = writer()
    folder = w.write_mlx_lm_checkpoint(tmp_path / "bf16-q4", w.nest_k25(w.tiny_k2_config()), bits=4,
                                       group_size=32, overrides=OVERRIDES, dtype="bfloat16")
    stored = sum(v.nbytes for k, v in mx.load(str(folder / "model.safetensors")).items())
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", "--model", str(folder), "--memory", "16", "--json"]) == 0
    plan = json.loads(buf.getvalue())
    assert plan["weight_bytes"] == stored


def test_mixed_mla_layouts_are_refused(written, tmp_path):
    from k2mlx.errors import CheckpointError
    from k2mlx.loading.checkpoint import mla_weights_of
    from k2mlx.loading import load_args

    args = load_args(written[("kimi_k2", "float32")])
    assert mla_weights_of(["model.layers.0.self_attn.embed_q.weight"], args) == "split"
    assert mla_weights_of(["model.layers.0.self_attn.kv_b_proj.weight"], args) == "kv_b"
    with pytest.raises(CheckpointError, match="mixes two MLA layouts"):
        mla_weights_of(["model.layers.0.self_attn.embed_q.weight", "model.layers.1.self_attn.kv_b_proj.weight"],
                       args)


@pytest.mark.parametrize("form", ["kimi_k2", "kimi_k25"])
def test_check_passes_on_mlx_lm_checkpoints(written, form):
    """Per-module overrides, embed_q/unembed_out and the dropped vision tower are all as the
    config says; only the tokenizer (mlx-lm's writer here copies none) is reported."""
    from k2mlx.loading.check import check

    r = check(written[(form, "q4")])
    assert [x.split(":")[0] for x in r.faults] == ["missing tokenizer", "missing chat template"], r.faults
