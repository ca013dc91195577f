"""`k2mlx check`: one line per fault, exit 1; a clean checkpoint prints its format, bits, size
and bytes per layer range, exit 0. Headers only: no tensor data is read."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct

import pytest

from k2mlx.cli import main
from k2mlx.loading.check import check
from k2mlx.loading.resolve import embedded_model_path


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A tiny float K2 with a tokenizer and chat template, one shard per layer."""
    from k2mlx.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("check") / "k2", num_shards=4)


@pytest.fixture
def copy(clean, tmp_path):
    def make(src=None):
        dst = tmp_path / "ckpt"
        shutil.copytree(src or clean, dst)
        return dst
    return make


def run(*argv) -> tuple[int, list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["check", *argv])
    return rc, out.getvalue().splitlines()


def only_fault(folder, kind, layers=None) -> str:
    r = check(folder, layers)
    assert not r.ok and len(r.faults) == 1, r.faults
    assert r.faults[0].startswith(kind + ": "), r.faults
    return r.faults[0]


def test_clean_checkpoint_passes_with_a_summary(clean):
    rc, lines = run("--model", str(clean))
    assert rc == 0 and lines[0] == f"{clean}: ok"
    text = "\n".join(lines)
    assert "format: float (kimi_k2, MLA kv_b_proj)" in text and "bits: float (F32)" in text
    stored = sum(f.stat().st_size for f in clean.glob("*.safetensors"))
    size_line = next(x for x in lines if "total size" in x)
    assert "4 shard file(s)" in size_line
    # the sizes are data bytes of the tensors: a little below the files' sizes (headers)
    nbytes = int(size_line.split("(")[1].split(" bytes")[0].replace(",", ""))
    assert 0.97 * stored < nbytes < stored
    assert [x.strip().split(":")[0] for x in lines if x.strip().startswith("layers ")] == \
        ["layers 0", "layers 1", "layers 2", "layers 3"]


def test_embedded_model_and_mlx_quantized_summary():
    rc, lines = run("--model", str(embedded_model_path()))
    assert rc == 0 and any("bits: 4-bit, group size 32" in x for x in lines)


def test_missing_shard(copy):
    d = copy()
    (d / "model-00003-of-00004.safetensors").unlink()
    line = only_fault(d, "missing shard")
    assert "model-00003-of-00004.safetensors" in line
    rc, lines = run("--model", str(d))
    assert rc == 1 and lines == [line]
    # a stage that does not need that shard is fine
    assert check(d, range(0, 2)).ok


def test_truncated_shard(copy):
    d = copy()
    f = d / "model-00002-of-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    line = only_fault(d, "truncated shard")
    assert "model-00002-of-00004.safetensors" in line and "truncated" in line


def _rewrite_header(file, edit):
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    file.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def test_wrong_shape(copy):
    d = copy()
    name = "model.layers.1.self_attn.q_a_proj.weight"

    def edit(h):
        assert h[name]["shape"][0] != h[name]["shape"][1]
        h[name]["shape"] = h[name]["shape"][::-1]  # same byte count, transposed shape
    _rewrite_header(d / "model-00002-of-00004.safetensors", edit)
    line = only_fault(d, "shape mismatch")
    assert name in line and "model-00002-of-00004.safetensors" in line


def test_wrong_dtype(copy):
    d = copy()
    name = "model.layers.2.input_layernorm.weight"

    def edit(h):
        h[name]["dtype"] = "I32"  # same size as F32
    _rewrite_header(d / "model-00003-of-00004.safetensors", edit)
    line = only_fault(d, "dtype mismatch")
    assert name in line and "int32" in line


def test_missing_and_unexpected_tensors(copy):
    d = copy()
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    gone = "model.layers.3.mlp.gate.e_score_correction_bias"
    f = index["weight_map"].pop(gone)
    index["weight_map"]["model.layers.3.mlp.extra.weight"] = f

    def edit(h):
        h["model.layers.3.mlp.extra.weight"] = h.pop(gone)
    _rewrite_header(d / f, edit)
    index_file.write_text(json.dumps(index))
    r = check(d)
    assert sorted(x.split(":")[0] for x in r.faults) == ["missing tensor", "unexpected tensor"], r.faults
    assert any(gone in x for x in r.faults) and any("model.layers.3.mlp.extra.weight" in x for x in r.faults)


def test_index_entry_its_shard_lacks(copy):
    d = copy()
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.self_attn.o_proj.weight"] = "model-00002-of-00004.safetensors"
    index_file.write_text(json.dumps(index))
    r = check(d)
    assert any(x.startswith("index mismatch: model.layers.0.self_attn.o_proj.weight") for x in r.faults), r.faults


def test_missing_tokenizer_and_chat_template(copy):
    d = copy()
    (d / "tiktoken.model").unlink()
    line = only_fault(d, "missing tokenizer")
    assert "tiktoken.model" in line
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert [x.split(":")[0] for x in check(d).faults] == ["missing tokenizer", "missing chat template"]


@pytest.mark.parametrize("change,says", [({"group_size": 64}, "group size 64"), ({"bits": 8}, "bits 8")])
def test_quantization_config_that_disagrees_with_the_tensors(copy, change, says):
    d = copy(embedded_model_path())  # 4-bit, group size 32
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"].update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    r = check(d)
    assert r.faults and all(x.startswith("quantization mismatch: ") for x in r.faults), r.faults
    assert says in r.faults[0] and "stored tensors are bits 4, group size 32" in r.faults[0]
    assert r.faults[-1].startswith("quantization mismatch: ... and ")  # summarised, not 100 lines
    cfg.pop("quantization")
    (d / "config.json").write_text(json.dumps(cfg))
    r = check(d)
    assert r.faults and all("config.json has no quantization" in x for x in r.faults[:-1]), r.faults


def test_reads_headers_only(clean, monkeypatch):
    """No tensor data is read: mx.load is never called, and corrupt data bytes go unnoticed."""
    import mlx.core as mx

    def no_load(*a, **k):
        raise AssertionError("check read tensor data")
    monkeypatch.setattr(mx, "load", no_load)
    assert check(clean).ok


def test_repo_id_and_cli_errors(clean, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, lines = run("--model", "org/absent")
    assert rc == 1 and lines == ["missing checkpoint: org/absent is not in the local Hugging Face cache "
                                 f"({tmp_path / 'hub'}); fetch it with: k2mlx download org/absent"]
    snap = tmp_path / "hub" / "models--org--k2" / "snapshots" / "abc123"
    shutil.copytree(clean, snap)
    (snap / "model-00004-of-00004.safetensors").unlink()
    rc, lines = run("--model", "org/k2", "--layers", "0:2")
    assert rc == 0 and lines[0] == f"{snap}: ok"
    rc, lines = run("--model", "org/k2")
    assert rc == 1 and lines[0].startswith("missing shard: model-00004-of-00004.safetensors")


def test_load_names_a_quantization_config_that_does_not_fit(copy):
    """The loader used to stop with MLX's ValueError from inside nn.quantize."""
    from k2mlx.errors import CheckpointError
    from k2mlx.loading import load_model

    d = copy(embedded_model_path())
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"]["group_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization in config.json does not fit"):
        load_model(d)


def test_layer_specs(clean):
    assert check(clean, "2:").ok and check(clean, "0:1").ok
    rc, lines = run("--model", str(clean), "--layers", "3:")
    assert rc == 0 and any(x.strip().startswith("layers 3:4") for x in lines)
    with pytest.raises(Exception, match="valid layer range"):
        check(clean, "2:9")
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert main(["check", "--model", str(clean), "--layers", "x"]) == 1
    assert "START:STOP" in out.getvalue()
