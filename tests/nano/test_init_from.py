"""Continuing k2-nano's training from the shipped 4-bit asset (its float checkpoint is not kept):
the asset is dequantized to a float model that computes what the 4-bit one computes, trained,
and written as a float checkpoint for `k2mlx convert`."""
import json

import mlx.core as mx
import numpy as np
import pytest

from k2mlx.tiny import embedded_model_path

ASSET = embedded_model_path()
needs_asset = pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="k2-nano asset not built")


@needs_asset
def test_dequantized_asset_computes_what_the_4bit_model_computes():
    from k2mlx import load
    from k2mlx.nano.train import dequantized, is_quantized

    q, tok = load(ASSET)
    f = dequantized(q)
    assert is_quantized(q) and not is_quantized(f)
    assert f.args.quantization is None
    x = mx.array([tok.encode("What is 17 * 23? Hello there, list the files in docs.")])
    a, b = np.array(f(x)), np.array(q(x))
    np.testing.assert_allclose(a, b, atol=2e-4 * np.abs(b).max())
    assert (a[0].argmax(-1) == b[0].argmax(-1)).all()


def test_training_continues_from_a_quantized_checkpoint(tmp_path):
    """A small run -> float checkpoint -> `k2mlx convert` 4-bit -> `train(init_from=<4-bit>)`:
    the continued model is float (every linear trainable again), starts from the 4-bit model's
    loss, keeps the tokenizer, and its config carries no quantization block."""
    from k2mlx.nano.export import quantize_checkpoint, write_float_checkpoint
    from k2mlx.nano.train import TrainConfig, instruct_template, is_quantized, train

    from test_train import SMALL

    cfg = TrainConfig(seed=0, steps=3, batch_size=4, n_conversations=80, n_merges=200, tokenizer_sample=80,
                      warmup=1, clip_every=2, arch=dict(SMALL))
    first = train(cfg, tmp_path / "tok", template=instruct_template(), progress=False)
    write_float_checkpoint(first.model, first.config_dict, tmp_path / "tok", tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "q4", bits=4, group_size=32)
    more = train(TrainConfig(seed=5, steps=2, batch_size=4, n_conversations=40, warmup=1, clip_every=2,
                             arch=dict(SMALL)),
                 tmp_path / "tok2", template=instruct_template(), progress=False, init_from=tmp_path / "q4")
    assert not is_quantized(more.model)
    assert "quantization" not in more.config_dict and more.config_dict["vocab_size"] == first.config_dict["vocab_size"]
    assert (tmp_path / "tok2" / "tiktoken.model").read_bytes() == (tmp_path / "tok" / "tiktoken.model").read_bytes()
    assert all(np.isfinite(more.losses))
    write_float_checkpoint(more.model, more.config_dict, tmp_path / "tok2", tmp_path / "float2")
    assert "quantization" not in json.loads((tmp_path / "float2" / "config.json").read_text())
