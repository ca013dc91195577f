"""Each tensor-parallel rank reads only its slices of the checkpoint (issue 16, item 3).

How: the model is built with the checkpoint's quantization and sharded as this rank
(`tensor.shard_model(..., materialize=False, wrap=False)`: lazy placeholders of the shard's
shapes, never evaluated). For each parameter the one axis where the shard differs from the full
shape gives the slice [rank * n, (rank + 1) * n) in stored units (rows; packed 4-bit words and
group scales for columns; heads), and only that slice is read from the safetensors file: the
file's JSON header gives the tensor's offset, a read-only memory map exposes it, and only the
slice is copied out. Per-expert tensors (the Hugging Face layout) are sliced one by one and
stacked into the `switch_mlp` tensor. A rank's memory after load is its shard plus the
replicated parts, not the whole model.

Formats: MLX checkpoints (float or affine-quantized, kv_b or split MLA), float Hugging Face
checkpoints, compressed-tensors INT4 (K2-Thinking; the packed words, group scales and the
logical shape are sliced alike) and native FP8 (K2-Instruct: e4m3 codes [out, in] with float32
`weight_scale_inv` [ceil(out/bo), ceil(in/bi)] per bo x bi block, 128 x 128 in K2). An FP8
weight is read as exactly its slice of codes plus the rows (or columns) of the scale grid
covering it, rounded out to whole blocks; the block scales are expanded along the sliced axis
and cut to the slice, and the existing exact dequantization (`formats.fp8.dequantize`, float32,
what `load_model` keeps without a dtype) runs on the slice, so slice bounds need not fall on
block boundaries. At K2 scale they do for 2, 4, 8 and 16 ranks: per rank, q_b_proj rows
64/N heads x 192, kv_b_proj rows 64/N x 256, o_proj columns 64/N x 128, every expert's and the
shared expert's 2048/N intermediate rows (down_proj columns) and the dense MLP's 18432/N are all
multiples of 128 (at N = 32 the experts' 64 and the dense MLP's 576 are not; a test in
tests/distributed/test_dist_tensor_fp8.py checks this on K2's config). Replicated FP8 weights
(q_a_proj, kv_a_proj_with_mqa) are read whole and dequantized the same way.

Transformers-5 fused experts (float `mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and
`mlp.experts.down_proj` [E, H, I]) are sliced too: gate_up's rows of this rank in each half, the
columns of down_proj. Not sliced: anything else beside a fused tensor (e.g. quantization scales,
which the loader refuses as well): for it `load_shard` returns None and the rank loads the whole
checkpoint and keeps its slices (`tensor.shard_model`), peaking at the full size.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from k2mlx.errors import CheckpointError
# the loader's own patterns, on canonical names: a layer's prefix, and transformers-5 fused
# experts (gate_up_proj [E, 2I, H], gate rows first, and down_proj [E, H, I])
from k2mlx.loading.sanitize import _FUSED, _LAYER

log = logging.getLogger("k2mlx.distributed.slices")

# safetensors dtype -> (numpy dtype read from the file, MLX dtype it becomes)
_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, "bfloat16"),
           "U32": (np.uint32, None), "I32": (np.int32, None), "U8": (np.uint8, None),
           "I8": (np.int8, None), "I64": (np.int64, None), "U16": (np.uint16, None),
           "F8_E4M3": (np.uint8, None)}  # fp8 codes: decoded by formats.fp8


class SafetensorsFile:
    """One file's header, and reads of a tensor or a slice of it along one axis."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100 * 2**20:
                    raise ValueError("header too large")
                self.header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"not a readable safetensors file ({e})", file=str(path)) from e
        self.data_start = 8 + n

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of a tensor, from the header alone."""
        info = self.header.get(name)
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise CheckpointError("tensor listed in the index is not in its file", file=str(self.path), tensor=name)
        return str(info.get("dtype")), tuple(int(d) for d in info["shape"])

    def read(self, name: str, axis: int | None = None, start: int = 0, stop: int = 0) -> mx.array:
        info = self.header.get(name)
        if not isinstance(info, dict):
            raise CheckpointError("tensor listed in the index is not in its file", file=str(self.path), tensor=name)
        kind = info.get("dtype")
        if kind not in _DTYPES:
            raise CheckpointError(f"dtype {kind} cannot be sliced here", file=str(self.path), tensor=name)
        np_dtype, mx_dtype = _DTYPES[kind]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
            raise CheckpointError("tensor size does not match its shape", file=str(self.path), tensor=name)
        if not shape:
            mm = np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.data_start + begin, shape=(1,))
            out = np.array(mm).reshape(())
        else:
            mm = np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.data_start + begin, shape=shape)
            if axis is not None:
                idx = [slice(None)] * len(shape)
                idx[axis] = slice(start, stop)
                mm = mm[tuple(idx)]
            out = np.ascontiguousarray(mm)  # copies the slice only; the map is dropped below
        del mm
        arr = mx.array(out)
        return arr.view(getattr(mx, mx_dtype)) if mx_dtype else arr


_FLOAT = ("F32", "F16", "BF16")


def _unsupported(index: dict) -> str | None:
    """Why this checkpoint is not read in slices, or None."""
    fused = [n for n in index if re.search(r"\.experts\.(gate_up|down)_proj[._]", n + ".")]
    if any(not _FUSED.match(n.removeprefix("language_model.")) for n in fused):
        # e.g. scales beside a fused tensor: the loader itself refuses them, with its own message
        return "quantized fused experts (transformers 5)"
    return None


def _read_fp8(wfile: SafetensorsFile, name: str, sfile: SafetensorsFile, scale_name: str,
              block: tuple[int, int], c: tuple[int, int, int] | None) -> mx.array:
    """float32 values of an FP8 weight, or of its slice `c` = (axis, start, stop): the codes of
    the slice only, the scale grid's rows (columns) covering it, and the loader's own exact
    dequantization with the block scales expanded along the sliced axis (block 1 there)."""
    from k2mlx.loading.formats.fp8 import SCALE_SUFFIX, dequantize

    base = name[: -len(".weight")]
    kind, shape = wfile.info(name)
    if kind not in ("F8_E4M3", "U8") or len(shape) != 2:
        raise CheckpointError(f"an fp8 weight must be 2-D e4m3 codes, got {kind} {list(shape)}",
                              file=str(wfile.path), tensor=name)
    grid = tuple(-(-d // b) for d, b in zip(shape, block))
    skind, sshape = sfile.info(scale_name)
    if skind not in _FLOAT:
        raise CheckpointError(f"an fp8 block scale must be float, got {skind}", file=str(sfile.path),
                              tensor=scale_name)
    if sshape != grid:
        raise CheckpointError(f"fp8 block scale has shape {sshape}, expected {grid} for a weight of shape "
                              f"{shape} with {block[0]}x{block[1]} blocks", file=str(sfile.path),
                              tensor=base + SCALE_SUFFIX)
    if c is None:
        return dequantize(wfile.read(name), sfile.read(scale_name), block, name=base, file=str(wfile.path))
    axis, lo, hi = c
    b = block[axis]
    first = lo // b  # the block holding the slice's first row (column)
    codes = wfile.read(name, axis, lo, hi)
    scale = sfile.read(scale_name, axis, first, -(-hi // b)).astype(mx.float32)
    # one scale per row (column) of the slice: the slice starts lo - first * b into its first block
    per = mx.repeat(scale, b, axis=axis)
    off = lo - first * b
    scale = per[off: off + hi - lo] if axis == 0 else per[:, off: off + hi - lo]
    one = (1, block[1]) if axis == 0 else (block[0], 1)
    return dequantize(codes, scale, one, name=base, file=str(wfile.path))


def _read_fused(f: SafetensorsFile, name: str, prefix: str, which: str, inter: int, cut) -> dict:
    """This rank's slices of a fused expert tensor, under the stacked names `split_fused_experts`
    would give the whole one: gate_up_proj's rows [r*n, (r+1)*n) become gate_proj and the same
    rows of its second half up_proj; down_proj's columns are cut like any down_proj's."""
    kind, shape = f.info(name)
    want = [None, 2 * inter, None] if which == "gate_up_proj" else [None, None, inter]
    if kind not in _FLOAT or len(shape) != 3 or any(w is not None and w != d for w, d in zip(want, shape)):
        raise CheckpointError(f"a fused expert tensor must be float [E, {'2I, hidden' if want[1] else 'hidden, I'}]"
                              f" with I = {inter}, got {kind} {list(shape)}", file=str(f.path), tensor=name)
    if which == "down_proj":
        target = f"{prefix}.switch_mlp.down_proj.weight"
        c = cut(target, 0)
        w = f.read(name, *c) if c else f.read(name)
        mx.eval(w)
        return {target: w}
    out = {}
    for half, proj in enumerate(("gate_proj", "up_proj")):
        target = f"{prefix}.switch_mlp.{proj}.weight"
        axis, lo, hi = cut(target, 0) or (1, 0, inter)  # [E, I, H]: sliced on axis 1
        out[target] = f.read(name, axis, half * inter + lo, half * inter + hi)
        mx.eval(out[target])
    return out


# a source tensor's suffix -> the parameter suffix it becomes (compressed-tensors INT4)
_TARGET_SUFFIX = {"weight_packed": "weight", "weight_scale": "scales"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


def _target(canon: str) -> tuple[str, int]:
    """The model parameter a (canonical) checkpoint tensor ends up in, and how many leading
    axes that parameter has in front of the tensor's (1 for a per-expert tensor: experts are
    stacked into switch_mlp)."""
    base, _, suffix = canon.rpartition(".")
    m = _EXPERT.match(base)
    if m:
        base = f"{m.group(1)}.switch_mlp.{m.group(2)}"
    return f"{base}.{_TARGET_SUFFIX.get(suffix, suffix)}", 1 if m else 0


def load_shard(path, rank: int, size: int, group, moe_path: str | None = None):
    """(model, tokenizer) with only this rank's slices read and the all_sums in place, or None
    when the checkpoint's format is not sliced here (then load whole and `shard_model`).

    Every checkpoint tensor is sliced where its parameter is (a compressed-tensors module's
    packed words, scales and shape alike: a slice of one is a valid module of the slice's
    shape), and then the loader's own `sanitize` turns the slices into parameters exactly as
    it turns whole tensors (per-expert stacking, INT4 repacking)."""
    from mlx.utils import tree_flatten

    from k2mlx.kernels.policy import configure, requested_path
    from k2mlx.loading import load_args, load_config, quantize_model
    from k2mlx.loading.checkpoint import mla_weights_of, tensor_index
    from k2mlx.loading.formats.compressed_tensors import load_quantization
    from k2mlx.loading.formats.fp8 import SCALE_SUFFIX, block_size
    from k2mlx.loading.resolve import resolve_model
    from k2mlx.loading.sanitize import canonical_name, sanitize
    from k2mlx.model.k2 import Model
    from k2mlx.tokenizer import load_tokenizer

    from .tensor import add_all_sums, shard_model

    moe_path = requested_path(moe_path)
    path = Path(resolve_model(path, None))
    config, args = load_config(path), load_args(path)
    index = tensor_index(path)
    why = _unsupported(index)
    if why is not None:
        log.warning("rank %d: %s checkpoints are not read in slices yet: loading it whole", rank, why)
        return None
    tokenizer = load_tokenizer(path)
    canon = {n: c for n in index if (c := canonical_name(n, args.num_hidden_layers)) is not None}
    targets = {n: _target(c) for n, c in canon.items()}
    model = Model(args, mla_weights=mla_weights_of(index, args, path))
    quantization = config.get("quantization") or args.quantization or load_quantization(config)
    quantize_model(model, quantization, {t for t, _ in targets.values()})
    per_word = 32 // int((quantization or {}).get("bits") or 4)  # codes per packed word
    full = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    shard_model(model, rank, size, group, materialize=False, wrap=False)
    shard = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    files: dict[str, SafetensorsFile] = {}

    def cut(target: str, lead: int):
        """(axis of the checkpoint tensor, start, stop) of this rank's slice, or None: whole."""
        if target not in full:
            return None  # not a parameter (e.g. weight_shape): handled by its module
        diff = [a for a, (x, y) in enumerate(zip(full[target], shard[target])) if x != y]
        if not diff:
            return None
        n = shard[target][diff[0]]
        return diff[0] - lead, rank * n, (rank + 1) * n

    def file(name: str) -> SafetensorsFile:
        fname = index[name]
        if fname not in files:
            files[fname] = SafetensorsFile(path / fname)
        return files[fname]

    # FP8 (`X.weight` e4m3 + `X.weight_scale_inv`): each pair is read and dequantized together
    fp8_scales = {n[: -len(SCALE_SUFFIX)] + ".weight": n for n in canon if n.endswith(SCALE_SUFFIX)}
    block = block_size({"quantization_config": args.quantization_config or {}})  # as the loader's fp8 hook
    def read(sliced: dict, name: str, target: str, lead: int) -> None:
        """This rank's part of one checkpoint tensor into `sliced`, read now (evaluated)."""
        if fp8_scales and name.endswith((SCALE_SUFFIX, ".input_scale")):
            return  # read with its weight / a static activation scale the loader drops too
        if name in fp8_scales:
            sliced[name] = _read_fp8(file(name), name, file(fp8_scales[name]), fp8_scales[name], block,
                                     cut(target, lead))
            mx.eval(sliced[name])
            return
        f = file(name)
        fused = _FUSED.match(canon[name])
        if fused:
            sliced.update(_read_fused(f, name, fused.group(1), fused.group(2), args.moe_intermediate_size, cut))
            return
        if f.info(name)[0] == "F8_E4M3":
            raise CheckpointError("fp8 codes without their weight_scale_inv", file=str(f.path), tensor=name)
        if name.endswith(".weight_shape"):  # the packed module's logical shape, sliced alike
            shape = np.array(f.read(name)).astype(np.int64)
            c = cut(target[: -len("weight_shape")] + "weight", lead)
            if c is not None:
                axis, lo, hi = c
                shape[axis] = (hi - lo) * (per_word if axis == 1 else 1)  # packed words -> columns
            sliced[name] = mx.array(shape)
            return
        c = cut(target, lead)
        sliced[name] = f.read(name, *c) if c else f.read(name)
        mx.eval(sliced[name])  # read now, one tensor at a time: nothing full-size is held

    # One layer at a time: its slices are read, turned into parameters by the loader's own
    # `sanitize` (per-layer: expert stacking, INT4 repacking, FP8) and evaluated before the next
    # layer is read, so the per-expert slices and their stacked copy coexist for one layer only
    # (all at once, a rank peaked at 0.84x one process on a 0.8 GB checkpoint).
    by_layer: dict[int, list[str]] = {}
    for name in targets:
        m = _LAYER.match(canon[name])
        by_layer.setdefault(int(m.group(1)) if m else -1, []).append(name)
    weights = {}
    for layer in sorted(by_layer):
        sliced: dict = {}
        for name in by_layer[layer]:
            read(sliced, name, *targets[name])
        part = sanitize(sliced, args)
        mx.eval(list(part.values()))
        weights.update(part)
        del sliced, part
    del files
    for name, shape in shard.items():
        w = weights.get(name)
        if w is None:
            raise CheckpointError("tensor missing from the checkpoint", file=str(path), tensor=name)
        if tuple(w.shape) != shape:
            raise CheckpointError(f"slice shape {list(w.shape)} does not match the shard's {list(shape)}",
                                  file=str(path), tensor=name)
        if name.endswith("o_proj.bias") and rank != 0:
            weights[name] = mx.zeros_like(w)  # a row-split product's bias is added once
    model.load_weights([(k, weights[k]) for k in shard], strict=True)
    mx.eval(model.parameters())
    del weights
    model.eval()
    configure(model, moe_path)
    add_all_sums(model, group)
    return model, tokenizer
