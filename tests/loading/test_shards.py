"""Per-layer loading: a stage's shard files from the index, loading a layer range with every
other shard absent, hub allow-patterns, and `k2mlx download`'s offline error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import k2mlx
import k2mlx.loading
from mlx_lm.models.base import create_attention_mask
from k2mlx.errors import CheckpointError, K2Error
from k2mlx.loading import shards
from k2mlx.loading.download import parse_layers, patterns_for


def _only(folder, files, dst):
    """Copy of `folder` holding only `files` among its shards (config, index kept)."""
    dst.mkdir()
    for p in folder.iterdir():
        if not p.name.endswith(".safetensors") or p.name in files:
            shutil.copy2(p, dst / p.name)
    return dst


def test_files_for_layers(bf16_case):
    folder = bf16_case[0]  # 3 layers, one shard per layer + embed + head
    assert shards.files_for_layers(folder, range(0, 1)) == ["model-embed.safetensors", "model-layer00.safetensors"]
    assert shards.files_for_layers(folder, range(1, 2)) == ["model-layer01.safetensors"]
    assert shards.files_for_layers(folder, range(1, 3)) == [
        "model-head.safetensors", "model-layer01.safetensors", "model-layer02.safetensors"]
    assert shards.files_for_layers(folder, None) == sorted(p.name for p in folder.glob("*.safetensors"))
    # explicit first/last override the defaults (e.g. a middle stage that also serves logits)
    assert "model-head.safetensors" in shards.files_for_layers(folder, range(1, 2), last=True)


def test_selection_rules_on_a_k2_index():
    """The real K2 shape of names: MTP layer 61 and K2.5's vision tower never selected;
    tied embeddings put the embedding on the last stage too."""
    wm = {f"model.layers.{i}.mlp.down_proj.weight": f"s{i}" for i in range(62)}
    wm.update({"model.embed_tokens.weight": "e", "model.norm.weight": "h", "lm_head.weight": "h",
               "vision_tower.blocks.0.w": "v"})
    assert shards.files_for_layers(wm, range(31, 61), num_layers=61) == ["h"] + sorted(f"s{i}" for i in range(31, 61))
    assert "s61" not in shards.files_for_layers(wm, None, num_layers=61)
    assert "v" not in shards.files_for_layers(wm, None, num_layers=61)
    assert "e" in shards.files_for_layers(wm, range(31, 61), num_layers=61, tied=True)
    k25 = {"language_model." + k: v for k, v in wm.items()}
    assert shards.files_for_layers(k25, range(0, 2), num_layers=61) == ["e", "s0", "s1"]
    pats = shards.allow_patterns(wm, range(0, 2), num_layers=61)
    assert "config.json" not in pats and "*.json" in pats and "*.model" in pats and "*.jinja" in pats
    assert [p for p in pats if p.startswith("s") or p == "e"] == ["e", "s0", "s1"]


@pytest.mark.parametrize("layers", [range(0, 1), range(1, 2), range(2, 3), range(1, 3)])
def test_load_stage_opens_only_its_shards(layers, bf16_case, tmp_path):
    """The other shard files are deleted: loading must never need them; the stage computes
    exactly what the full model computes for its layers."""
    folder = bf16_case[0]
    needed = shards.files_for_layers(folder, layers)
    part = _only(folder, needed, tmp_path / "part")
    stage = k2mlx.loading.load_model(part, layers=layers, dtype="float32")
    assert stage.layer_range == layers
    full = k2mlx.loading.load_model(folder, dtype="float32")
    tokens = mx.array([[5, 9, 200, 3]])
    hs = [full.embed(tokens)]
    mask = create_attention_mask(hs[0], None, return_array=True)
    for layer in full.layers:
        hs.append(layer(hs[-1], mask, None))
    x = stage.embed(tokens) if stage.is_first else hs[layers.start]
    y = stage.forward_layers(x)
    assert np.allclose(np.array(y), np.array(hs[layers.stop]), atol=1e-5)
    if stage.is_last:
        assert np.allclose(np.array(stage.head(y)), np.array(full(tokens)), atol=1e-4)


def test_missing_needed_shard_names_file(bf16_case, tmp_path):
    folder = bf16_case[0]
    needed = shards.files_for_layers(folder, range(1, 2))
    part = _only(folder, [], tmp_path / "none")
    with pytest.raises(CheckpointError) as e:
        k2mlx.loading.load_model(part, layers=range(1, 2))
    assert needed[0] in str(e.value) and "model.layers.1." in str(e.value)


def test_load_tensors_reads_only_needed_files(bf16_case, tmp_path):
    folder = bf16_case[0]
    part = _only(folder, shards.files_for_layers(folder, range(2, 3)), tmp_path / "p")
    got = shards.load_tensors(part, layers=range(2, 3))
    assert "lm_head.weight" in got and "model.embed_tokens.weight" not in got
    assert all(shards.layer_of(k) in (None, 2) for k in got)
    with pytest.raises(CheckpointError, match="model-layer01.safetensors"):
        shards.load_tensors(part, layers=range(1, 2))


def test_download_patterns_and_layer_spec(bf16_case):
    folder = bf16_case[0]
    cfg = json.loads((folder / "config.json").read_text())
    wm = shards.read_index(folder)
    pats = patterns_for(cfg, wm, parse_layers("1:", 3))
    assert "model-layer01.safetensors" in pats and "model-head.safetensors" in pats
    assert "model-layer00.safetensors" not in pats and "model-embed.safetensors" not in pats
    assert parse_layers("0:31", 61) == range(0, 31) and parse_layers(None) is None
    for bad in ("5", "3:1", "a:b", "0:99"):
        with pytest.raises(K2Error, match="layer"):
            parse_layers(bad, 61)


def test_download_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "k2mlx.cli", "download", "moonshotai/Kimi-K2-Instruct",
                        "--layers", "0:31", "--out", str(tmp_path / "dl")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "cannot download moonshotai/Kimi-K2-Instruct" in r.stderr and "Traceback" not in r.stderr
