"""Tensor parallelism on native FP8 checkpoints (K2-Instruct's layout: e4m3 codes [out, in] and
float32 `weight_scale_inv` per block): each rank reads only its slices of the codes and the scale
rows (columns) covering them, and gets exactly what loading the whole checkpoint and cutting it
gives, whether or not the slice bounds fall on block boundaries. At the end, the other layout the
slice loader learnt with it: transformers-5 fused experts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from test_dist_pipeline import PROMPTS, compare, reference
from test_dist_tensor import assert_ranks_under, launch_tp

# nano's slices of rank 1 of 2 start at row 16 (experts), 48 (q_b_proj: 2 heads x 24), 64 (kv_b_proj,
# dense MLP) and column 32 (o_proj), 16 (down_proj): all on 16-wide blocks, none on 128 or 12/20
BLOCKS = {"aligned-16": [16, 16], "k2-128": [128, 128], "ragged-12x20": [12, 20]}


def _is_fp8_linear(name: str) -> bool:
    """What K2-Instruct stores in FP8: every linear of a layer; not the router, norms, embeddings, head."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") or name.endswith("_mqa.weight")


def write_fp8(src, dst, block, seed=0, bad_scale: str | None = None):
    """A copy of float checkpoint `src` with every layer linear as e4m3 codes + block scales
    (`bad_scale`: one scale grid written a block row short, a corrupt file)."""
    from k2mlx.loading.formats import fp8
    from k2mlx.loading.formats.writer import to_numpy, write_safetensors

    rng = np.random.default_rng(seed)
    bo, bi = block
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weight_map = {}
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        for name, w in mx.load(str(f)).items():
            if not _is_fp8_linear(name):
                out[name] = to_numpy(w)
                continue
            w = np.array(w, np.float32)
            rows, cols = w.shape
            gr, gc = -(-rows // bo), -(-cols // bi)
            pad = np.zeros((gr * bo, gc * bi), np.float32)
            pad[:rows, :cols] = np.abs(w)
            amax = pad.reshape(gr, bo, gc, bi).max(axis=(1, 3))
            scale = (amax / 448 * rng.uniform(1.0, 1.5, amax.shape)).astype(np.float32)
            full = np.repeat(np.repeat(scale, bo, 0), bi, 1)[:rows, :cols]
            base = name[: -len(".weight")]
            out[name] = (fp8.encode_e4m3_numpy(w / full), "F8_E4M3")
            out[base + ".weight_scale_inv"] = (scale[:-1] if base == bad_scale else scale, "F32")
        write_safetensors(dst / f.name, out)
        weight_map.update({k: f.name for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


@pytest.fixture(scope="module")
def fp8_checkpoints(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("k2-fp8")
    return {case: write_fp8(tiny_checkpoint, root / case, block) for case, block in BLOCKS.items()}


def _params(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def _load_then_cut(path, rank, size):
    from k2mlx import load
    from k2mlx.distributed.tensor import shard_model

    model = load(str(path))[0]
    shard_model(model, rank, size, group=None)
    return model


def test_the_fixture_is_fp8_and_its_slices_cut_blocks(fp8_checkpoints):
    """The checkpoints hold e4m3 codes with the intended block grids (the equivalence tests below
    would pass trivially on a float checkpoint)."""
    from k2mlx.distributed.slices import SafetensorsFile

    path = fp8_checkpoints["k2-128"]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    f = SafetensorsFile(path / index[name])
    assert f.info(name) == ("F8_E4M3", (64, 32))
    assert f.info(name[: -len("weight")] + "weight_scale_inv") == ("F32", (1, 1))
    assert SafetensorsFile(path / index["model.embed_tokens.weight"]).info("model.embed_tokens.weight")[0] == "F32"
    r = SafetensorsFile(fp8_checkpoints["ragged-12x20"] / index[name])
    assert r.info(name[: -len("weight")] + "weight_scale_inv")[1] == (6, 2)  # ceil(64/12), ceil(32/20)


@pytest.mark.parametrize("case", list(BLOCKS))
@pytest.mark.parametrize("rank,size", [(0, 2), (1, 2), (3, 4)])
def test_fp8_slices_equal_load_then_cut(fp8_checkpoints, case, rank, size):
    """Every parameter of the sliced load is bit-identical (same dtype: float32 from the exact
    dequantization, as load_model keeps it) to loading the whole checkpoint and cutting it."""
    from k2mlx.distributed.slices import load_shard

    path = fp8_checkpoints[case]
    got = _params(load_shard(path, rank, size, None)[0])
    want = _params(_load_then_cut(path, rank, size))
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert bool(mx.array_equal(got[k], w)), k
    assert want["model.layers.1.mlp.inner.switch_mlp.gate_proj.weight"].dtype == mx.float32


def test_fp8_load_reads_only_the_slices(fp8_checkpoints, monkeypatch):
    """Spy on the one reader: every FP8 tensor of a sharded parameter is read as a slice (half
    its bytes at two ranks), and the scale grids only where the slice covers them."""
    from k2mlx.distributed import slices

    reads = []
    real = slices.SafetensorsFile.read

    def spy(self, name, axis=None, start=0, stop=0):
        out = real(self, name, axis, start, stop)
        reads.append((name, axis, out.nbytes, self.info(name)[1]))
        return out

    monkeypatch.setattr(slices.SafetensorsFile, "read", spy)
    slices.load_shard(fp8_checkpoints["k2-128"], 1, 2, None)
    by_name = {n: (axis, nbytes, shape) for n, axis, nbytes, shape in reads}
    assert len(by_name) == len(reads)  # nothing read twice
    sharded = [n for n in by_name if _is_fp8_linear(n) and not n.endswith(("q_a_proj.weight", "_mqa.weight"))]
    assert len(sharded) > 50  # experts, shared experts, dense MLP, q_b, kv_b, o_proj of 4 layers
    for n in sharded:
        axis, nbytes, shape = by_name[n]
        assert axis is not None and nbytes * 2 == int(np.prod(shape)), (n, axis, nbytes, shape)
    whole = [n for n in by_name if n.endswith(("q_a_proj.weight", "_mqa.weight"))]  # replicated
    assert whole and all(by_name[n][0] is None for n in whole)


def test_a_short_scale_grid_is_one_line_naming_the_tensor(tiny_checkpoint, tmp_path):
    from k2mlx.distributed.slices import load_shard
    from k2mlx.errors import CheckpointError

    bad = "model.layers.1.mlp.experts.2.up_proj"
    path = write_fp8(tiny_checkpoint, tmp_path / "bad", [12, 20], bad_scale=bad)
    with pytest.raises(CheckpointError) as e:
        load_shard(path, 1, 2, None)
    msg = str(e.value)
    assert "\n" not in msg and bad + ".weight_scale_inv" in msg and "expected (3, 4)" in msg, msg


@pytest.mark.parametrize("case", ["aligned-16", "k2-128"])
def test_fp8_tensor_logits_match_single_process(fp8_checkpoints, case, tmp_path):
    """Two ranks on loopback, each reading its FP8 slices, against one process on the same files."""
    from k2mlx import load

    path = fp8_checkpoints[case]
    args = {"prompts": PROMPTS[:2], "steps": 4}
    reference(load(str(path))[0], "greedy_logits", {**args, "out": str(tmp_path / "ref.npz")})
    p = launch_tp(path, "greedy_logits", {**args, "out": str(tmp_path / "tp.npz")})
    assert "loading it whole" not in p.stderr  # each rank took the slice path
    compare(tmp_path / "ref.npz", tmp_path / "tp.npz")
    ref = json.loads((tmp_path / "ref.npz.json").read_text())["tokens"]
    assert json.loads((tmp_path / "tp.npz.json").read_text())["tokens"] == ref


def test_each_fp8_rank_reads_only_its_slices(tmp_path):
    """An FP8 checkpoint (~110 MB on disk, ~420 MB as the float32 the loader dequantizes to):
    a rank's peak RSS right after load is under 0.7x the one-process peak RSS after load."""
    from k2mlx.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "wide", preset="small", dtype="float32", seed=0, num_hidden_layers=6,
                               hidden_size=768, moe_intermediate_size=512, intermediate_size=1536,
                               n_routed_experts=16, num_experts_per_tok=4)
    ckpt = write_fp8(src, tmp_path / "wide-fp8", [128, 128])
    shutil.rmtree(src)
    assert_ranks_under(ckpt, tmp_path, 0.7)


@pytest.mark.parametrize("size,aligned", [(2, True), (4, True), (8, True), (16, True), (32, False)])
def test_k2_slice_bounds_fall_on_128_blocks(size, aligned):
    """What slices.py's docstring says of K2 itself: with K2's shapes (two layers: the dense one and
    a MoE one; the model is built lazily, no weights) every sliced parameter's share is a multiple
    of K2's 128-wide FP8 blocks at 2 to 16 ranks, so no rank reads a block another rank also reads."""
    from mlx.utils import tree_flatten

    from k2mlx.config import ModelArgs
    from k2mlx.distributed.tensor import shard_model
    from k2mlx.model.k2 import Model

    cfg = json.loads((Path(__file__).parent.parent / "fixtures" / "kimi-k2-config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    args = ModelArgs.from_dict({**cfg, "num_hidden_layers": 2})
    full = {k: v.shape for k, v in tree_flatten(Model(args).parameters())}
    model = Model(args)
    shard_model(model, 0, size, None, materialize=False, wrap=False)
    shares = {k: [y for x, y in zip(full[k], v.shape) if x != y] for k, v in tree_flatten(model.parameters())}
    shares = {k: s[0] for k, s in shares.items() if s}
    assert len(shares) == 15  # q_b, kv_b, o_proj; dense gate/up/down; experts' and shared expert's
    off = sorted(k for k, n in shares.items() if n % 128)
    assert (off == []) == aligned, off


# ---- transformers-5 fused experts ----------------------------------------------------------------
def write_fused(src, dst, bad: bool = False):
    """A copy of `src` with each layer's per-expert tensors fused: gate_up_proj [E, 2I, H] (gate
    rows first), down_proj [E, H, I] (`bad`: one gate_up_proj a row short)."""
    import re

    from k2mlx.loading.formats.writer import to_numpy, write_safetensors

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors, experts = {}, {}
    for f in sorted(src.glob("*.safetensors")):
        for name, w in mx.load(str(f)).items():
            m = re.match(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+)_proj\.weight$", name)
            if m:
                experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = np.array(w)
            else:
                tensors[name] = to_numpy(w)
    for prefix, by in experts.items():
        E = len(by["gate"])
        gate_up = np.concatenate([np.stack([by["gate"][e] for e in range(E)]),
                                  np.stack([by["up"][e] for e in range(E)])], axis=1)
        tensors[prefix + ".experts.gate_up_proj"] = to_numpy(gate_up[:, 1:] if bad else gate_up)
        tensors[prefix + ".experts.down_proj"] = to_numpy(np.stack([by["down"][e] for e in range(E)]))
    write_safetensors(dst / "model.safetensors", tensors)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}))
    return dst


@pytest.fixture(scope="module")
def fused_checkpoint(tiny_checkpoint, tmp_path_factory):
    return write_fused(tiny_checkpoint, tmp_path_factory.mktemp("k2-fused") / "fused")


@pytest.mark.parametrize("rank,size", [(0, 2), (1, 2), (3, 4)])
def test_fused_expert_slices_equal_load_then_cut(fused_checkpoint, tiny_checkpoint, rank, size, monkeypatch):
    from k2mlx.distributed import slices

    index = json.loads((fused_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in index and not any(".experts.0." in n for n in index)
    reads = []
    real = slices.SafetensorsFile.read
    monkeypatch.setattr(slices.SafetensorsFile, "read",
                        lambda self, name, *a: reads.append((name, a)) or real(self, name, *a))
    got = _params(slices.load_shard(fused_checkpoint, rank, size, None)[0])
    want = _params(_load_then_cut(fused_checkpoint, rank, size))
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and bool(mx.array_equal(got[k], w)), k
    # the same numbers as the per-expert checkpoint it was fused from
    per_expert = _params(_load_then_cut(tiny_checkpoint, rank, size))
    assert all(bool(mx.array_equal(per_expert[k], w)) for k, w in want.items())
    fused = [(n, a) for n, a in reads if ".experts." in n]
    assert len(fused) == 3 * 3 and all(a and a[0] in (1, 2) for _, a in fused), fused  # slices only


def test_fused_tensor_of_the_wrong_shape_is_one_line(tiny_checkpoint, tmp_path):
    from k2mlx.distributed.slices import load_shard
    from k2mlx.errors import CheckpointError

    path = write_fused(tiny_checkpoint, tmp_path / "bad", bad=True)
    with pytest.raises(CheckpointError) as e:
        load_shard(path, 1, 2, None)
    msg = str(e.value)
    assert "\n" not in msg and "gate_up_proj" in msg and "I = 32" in msg, msg


def test_fused_tensor_logits_match_single_process(fused_checkpoint, tmp_path):
    from k2mlx import load

    args = {"prompts": PROMPTS[:2], "steps": 4}
    reference(load(str(fused_checkpoint))[0], "greedy_logits", {**args, "out": str(tmp_path / "ref.npz")})
    p = launch_tp(fused_checkpoint, "greedy_logits", {**args, "out": str(tmp_path / "tp.npz")})
    assert "loading it whole" not in p.stderr
    compare(tmp_path / "ref.npz", tmp_path / "tp.npz")
