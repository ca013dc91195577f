"""Broken checkpoints give a CheckpointError naming the file and the tensor, on load and on
convert; a failing convert leaves nothing behind."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import k2mlx
import k2mlx.loading
from k2mlx.errors import CheckpointError
from k2mlx.loading.convert import convert
from k2mlx.loading.formats.writer import write_safetensors


@pytest.fixture
def broken(bf16_case, tmp_path):
    """A fresh copy of the bf16 checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(bf16_case[0], dst)
    return dst


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _set_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _missing_shard(folder):
    (folder / "model-layer01.safetensors").unlink()
    return "model-layer01.safetensors", "model.layers.1."


def _truncated(folder):
    f = folder / "model-layer02.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    header = json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    return "model-layer02.safetensors", last


def _index_names_missing(folder):
    index = _index(folder)
    index["weight_map"]["model.layers.1.self_attn.o_proj.weight"] = "model-layer00.safetensors"
    _set_index(folder, index)
    return "model-layer00.safetensors", "model.layers.1.self_attn.o_proj.weight"


def _shape_mismatch(folder):
    """Layer 2's kv_b_proj one row short (a later layer: convert has written earlier ones)."""
    f = folder / "model-layer02.safetensors"
    header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
    header = json.loads(f.read_bytes()[8: 8 + header_len])
    data = f.read_bytes()[8 + header_len:]
    tensors = {}
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=np.uint16 if v["dtype"] == "BF16" else np.float32).reshape(v["shape"])
        if k == name:
            arr = arr[:-1]
        tensors[k] = (arr, v["dtype"])
    write_safetensors(f, tensors)
    return "model-layer02.safetensors", name


def _index_lacks_a_tensor(folder):
    index = _index(folder)
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    _set_index(folder, index)
    return "model.safetensors.index.json", "model.layers.1.self_attn.o_proj.weight"


CASES = {"missing shard": _missing_shard, "truncated file": _truncated,
         "index names a missing tensor": _index_names_missing, "shape mismatch": _shape_mismatch,
         "index lacks a needed tensor": _index_lacks_a_tensor}


@pytest.mark.parametrize("case", list(CASES))
def test_load_error_names_file_and_tensor(case, broken):
    file, tensor = CASES[case](broken)
    with pytest.raises(CheckpointError) as e:
        k2mlx.loading.load_model(broken)
    msg = str(e.value)
    assert file in msg and tensor in msg, msg


@pytest.mark.parametrize("case", list(CASES))
def test_convert_error_names_file_and_tensor_and_leaves_nothing(case, broken, tmp_path):
    file, tensor = CASES[case](broken)
    out = tmp_path / "out" / "converted"
    with pytest.raises(CheckpointError) as e:
        convert(broken, out, bits=4, group_size=32, progress=False, shard_bytes=50_000)
    msg = str(e.value)
    assert file in msg and tensor in msg, msg
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no .partial folder either


def test_failed_convert_keeps_existing_output(bf16_case, broken, tmp_path):
    """--force over an existing folder: a failure must leave the old folder untouched."""
    out = tmp_path / "out"
    convert(bf16_case[0], out, bits=8, group_size=32, progress=False)
    before = sorted(p.name for p in out.iterdir())
    _shape_mismatch(broken)
    with pytest.raises(CheckpointError):
        convert(broken, out, bits=4, group_size=32, progress=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/old folders
