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
checkpoints and compressed-tensors INT4 (K2-Thinking; the packed words, group scales and the
logical shape are sliced alike). Native FP8 is not: its 128x128 block scales rarely fall on a
rank's slice bounds; for it (and transformers-5 fused experts) `load_shard` returns None and
the rank loads the whole checkpoint and keeps its slices (`tensor.shard_model`), peaking at the
full size.
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

log = logging.getLogger("k2mlx.distributed.slices")

# safetensors dtype -> (numpy dtype read from the file, MLX dtype it becomes)
_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, "bfloat16"),
           "U32": (np.uint32, None), "I32": (np.int32, None), "U8": (np.uint8, None),
           "I8": (np.int8, None), "I64": (np.int64, None), "U16": (np.uint16, None)}


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


def _unsupported(config: dict, index: dict) -> str | None:
    from k2mlx.loading.formats.fp8 import is_fp8_config

    if is_fp8_config(config):
        return "native FP8"  # its 128x128 block scales rarely fall on a rank's slice bounds
    if any(re.search(r"\.experts\.(gate_up_proj|down_proj)(\.weight)?$", n) for n in index):
        return "fused experts (transformers 5)"
    return None


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
    from k2mlx.loading.resolve import resolve_model
    from k2mlx.loading.sanitize import canonical_name, sanitize
    from k2mlx.model.k2 import Model
    from k2mlx.tokenizer import load_tokenizer

    from .tensor import add_all_sums, shard_model

    moe_path = requested_path(moe_path)
    path = Path(resolve_model(path, None))
    config, args = load_config(path), load_args(path)
    index = tensor_index(path)
    why = _unsupported(config, index)
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

    sliced = {}
    for name, (target, lead) in targets.items():
        fname = index[name]
        if fname not in files:
            files[fname] = SafetensorsFile(path / fname)
        if name.endswith(".weight_shape"):  # the packed module's logical shape, sliced alike
            shape = np.array(files[fname].read(name)).astype(np.int64)
            c = cut(target[: -len("weight_shape")] + "weight", lead)
            if c is not None:
                axis, lo, hi = c
                shape[axis] = (hi - lo) * (per_word if axis == 1 else 1)  # packed words -> columns
            sliced[name] = mx.array(shape)
            continue
        c = cut(target, lead)
        sliced[name] = files[fname].read(name, *c) if c else files[fname].read(name)
        mx.eval(sliced[name])  # read now, one tensor at a time: nothing full-size is held
    del files
    weights = sanitize(sliced, args)
    del sliced
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
