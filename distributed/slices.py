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

Formats: MLX checkpoints (float or affine-quantized, kv_b or split MLA) and float Hugging Face
checkpoints. Native FP8 and INT4 (compressed-tensors) checkpoints need their block scales and
packed shapes sliced too; for them `load_shard` returns None and the rank loads the whole
checkpoint and keeps its slices (`tensor.shard_model`), which peaks at the full size.
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
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(\w+)$")


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
    from k2mlx.loading.formats.compressed_tensors import is_compressed_tensors
    from k2mlx.loading.formats.fp8 import is_fp8_config

    if is_fp8_config(config):
        return "native FP8"
    if is_compressed_tensors(config):
        return "compressed-tensors INT4"
    if any(re.search(r"\.experts\.(gate_up_proj|down_proj)(\.weight)?$", n) for n in index):
        return "fused experts (transformers 5)"
    return None


def load_shard(path, rank: int, size: int, group, moe_path: str | None = None):
    """(model, tokenizer) with only this rank's slices read and the all_sums in place, or None
    when the checkpoint's format is not sliced here (then load whole and `shard_model`)."""
    from mlx.utils import tree_flatten

    from k2mlx.kernels.policy import configure, requested_path
    from k2mlx.loading import load_args, load_config, quantize_model
    from k2mlx.loading.checkpoint import mla_weights_of, tensor_index
    from k2mlx.loading.resolve import resolve_model
    from k2mlx.loading.sanitize import canonical_name
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
    L = args.num_hidden_layers
    source = {}
    for n in index:
        c = canonical_name(n, L)
        if c is not None:
            source[c] = n
    model = Model(args, mla_weights=mla_weights_of(index, args, path))
    quantize_model(model, config.get("quantization") or args.quantization, source)
    full = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    shard_model(model, rank, size, group, materialize=False, wrap=False)
    files: dict[str, SafetensorsFile] = {}

    def read(name: str, axis, lo, hi):
        fname = index[source[name]]
        if fname not in files:
            files[fname] = SafetensorsFile(path / fname)
        return files[fname].read(source[name], axis, lo, hi)

    weights = []
    for name, p in tree_flatten(model.parameters()):
        shape = tuple(p.shape)
        diff = [a for a, (x, y) in enumerate(zip(full[name], shape)) if x != y]
        axis = diff[0] if diff else None
        lo, hi = (rank * shape[axis], (rank + 1) * shape[axis]) if diff else (0, 0)
        if name in source:
            w = read(name, axis, lo, hi)
        elif (m := _STACKED.match(name)) is not None:
            prefix, proj, kind = m.groups()
            per = [f"{prefix}.experts.{e}.{proj}.{kind}" for e in range(args.n_routed_experts)]
            missing = [n for n in per if n not in source]
            if missing:
                raise CheckpointError("tensor missing from the checkpoint", tensor=missing[0])
            w = mx.stack([read(n, None if axis is None else axis - 1, lo, hi) for n in per])
        else:
            raise CheckpointError("tensor missing from the checkpoint", tensor=name)
        if tuple(w.shape) != shape:
            raise CheckpointError(f"slice shape {list(w.shape)} does not match the shard's {list(shape)}",
                                  file=str(path / index.get(source.get(name, ""), "")), tensor=name)
        if name.endswith("o_proj.bias") and rank != 0:
            w = mx.zeros_like(w)  # a row-split product's bias is added once
        weights.append((name, w))
        mx.eval(w)  # read now, one tensor at a time: nothing full-size is ever held
    model.load_weights(weights, strict=True)
    del weights, files
    model.eval()
    configure(model, moe_path)
    add_all_sums(model, group)
    return model, tokenizer
