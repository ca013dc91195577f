"""Which shard files hold which tensors, and reading only the ones a layer range needs.

A pipeline rank owns layers a..b-1; it needs those layers' tensors, plus the embedding on the
first stage and the final norm + lm_head on the last. `model.safetensors.index.json` maps each
tensor name to its file, so a rank opens (and `k2mlx download --layers` fetches) only the files
that hold its part. Every read is checked against the safetensors header first, so a missing
shard, a truncated file, an index entry the file lacks or a shape mismatch raises a
CheckpointError naming the file and the tensor instead of crashing inside MLX.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path

from k2mlx.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# text weights may sit under `language_model.` (K2.5 nests the text model beside a vision tower)
_PREFIX = r"^(?:language_model\.)?"
_LAYER = re.compile(_PREFIX + r"model\.layers\.(\d+)\.")
_EMBED = re.compile(_PREFIX + r"model\.embed_tokens\.")
_HEAD = re.compile(_PREFIX + r"(?:model\.norm\.|lm_head\.)")
# files every host needs besides weights (config, tokenizer, chat template, remote code)
SIDE_PATTERNS = ["*.json", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.txt", "*.md"]


def layer_of(name: str) -> int | None:
    """Absolute decoder-layer index of a tensor name, or None for non-layer tensors."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def read_header(file: str | os.PathLike, tensor: str | None = None) -> dict:
    """The safetensors header {name: {dtype, shape, data_offsets}}, checked against the file size.

    tensor: a name the caller wants from this file, named in file-level errors."""
    file = str(file)
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("file is truncated (no safetensors header)", file=file, tensor=tensor)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"header length {n} exceeds the file size {size}", file=file, tensor=tensor)
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError("shard file is missing", file=file, tensor=tensor) from None
    except PermissionError:
        raise CheckpointError("shard file is not readable", file=file, tensor=tensor) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"safetensors header is corrupt ({e})", file=file, tensor=tensor) from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(
                f"file is truncated: tensor data ends at byte {end} of {data_size}", file=file, tensor=name)
    return header


def read_index(model_dir: str | os.PathLike) -> dict[str, str]:
    """tensor name -> file name (relative to model_dir), from the index or a single file."""
    d = Path(model_dir)
    idx = d / INDEX
    if idx.exists():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"index is unreadable ({e})", file=str(idx)) from None
        return dict(weight_map)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no safetensors files and no index in the model folder", file=str(d))
    return {name: f for f in files for name in read_header(d / f)}


def _text_config(model_dir) -> dict:
    p = Path(model_dir) / "config.json" if model_dir is not None else None
    if p is None or not p.exists():
        return {}
    cfg = json.loads(p.read_text())
    return {**cfg, **(cfg.get("text_config") or {})}


def _num_layers(weight_map: dict, model_dir=None) -> int:
    cfg = _text_config(model_dir)
    if "num_hidden_layers" in cfg:
        return int(cfg["num_hidden_layers"])
    found = [i for i in map(layer_of, weight_map) if i is not None]
    return max(found) + 1 if found else 0


def tensors_for_layers(index, layers: range | None, first: bool | None = None, last: bool | None = None,
                       num_layers: int | None = None, tied: bool | None = None) -> list[str]:
    """Tensor names a stage owning `layers` needs.

    index: a weight map {name: file} or a model folder. first/last default to whether the
    range starts at 0 / reaches num_layers (from config.json, or the index). Layers at or
    beyond num_layers (DeepSeek's MTP layer 61) and non-text tensors are never selected.
    With tied embeddings (`tied`, or tie_word_embeddings in config.json) the last stage also
    needs the embedding, which is its lm_head."""
    model_dir = None
    if not isinstance(index, dict):
        model_dir, index = index, read_index(index)
    if num_layers is None:
        num_layers = _num_layers(index, model_dir)
    if tied is None:
        tied = bool(_text_config(model_dir).get("tie_word_embeddings", False))
    if layers is None:
        layers = range(num_layers)
    first = layers.start == 0 if first is None else first
    last = layers.stop >= num_layers if last is None else last
    keep = []
    for name in index:
        i = layer_of(name)
        if i is not None:
            if i in layers and i < num_layers:
                keep.append(name)
        elif ((first or (last and tied)) and _EMBED.match(name)) or (last and _HEAD.match(name)):
            keep.append(name)
    return keep


def files_for_layers(index, layers: range | None, first: bool | None = None, last: bool | None = None,
                     num_layers: int | None = None, tied: bool | None = None) -> list[str]:
    """Sorted shard file names (relative) that hold the tensors a stage owning `layers` needs.

    index: weight map or model folder; see tensors_for_layers for the other arguments."""
    weight_map = index if isinstance(index, dict) else read_index(index)
    names = tensors_for_layers(index, layers, first, last, num_layers, tied)
    return sorted({weight_map[n] for n in names})


def allow_patterns(index, layers: range | None, first: bool | None = None, last: bool | None = None,
                   num_layers: int | None = None, tied: bool | None = None) -> list[str]:
    """huggingface_hub allow_patterns for one stage: its shard files plus config/tokenizer files."""
    return SIDE_PATTERNS + files_for_layers(index, layers, first, last, num_layers, tied)


def load_tensors(model_dir, names=None, layers: range | None = None, first: bool | None = None,
                 last: bool | None = None, num_layers: int | None = None, expected: dict | None = None) -> dict:
    """Read tensors (lazily, as MLX arrays) opening only the files that hold them.

    names: explicit tensor names; otherwise those of `layers` (see tensors_for_layers).
    expected: optional {name: shape}; a different stored shape is a CheckpointError."""
    import mlx.core as mx

    d = Path(model_dir)
    weight_map = read_index(d)
    if names is None:
        names = tensors_for_layers(weight_map, layers, first, last, num_layers if num_layers is not None
                                   else _num_layers(weight_map, d))
    by_file: dict[str, list[str]] = {}
    for n in names:
        if n not in weight_map:
            raise CheckpointError("tensor is not in the checkpoint index", file=str(d / INDEX), tensor=n)
        by_file.setdefault(weight_map[n], []).append(n)
    out = {}
    for fname, wanted in sorted(by_file.items()):
        path = d / fname
        header = read_header(path, tensor=wanted[0])
        for n in wanted:
            if n not in header:
                raise CheckpointError("the index names a tensor the shard does not hold", file=str(path), tensor=n)
        try:
            arrays = mx.load(str(path))
        except Exception as e:  # MLX's own message lacks the tensor; ours names the file
            log.debug("mx.load failed on %s", path, exc_info=True)  # the traceback at --log-level debug
            raise CheckpointError(f"cannot read shard ({e})", file=str(path)) from None
        for n in wanted:
            a = arrays[n]
            if expected and n in expected and tuple(a.shape) != tuple(expected[n]):
                raise CheckpointError(f"shape {tuple(a.shape)} does not match the model's {tuple(expected[n])}",
                                      file=str(path), tensor=n)
            out[n] = a
        del arrays
    return out
