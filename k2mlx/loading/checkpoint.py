"""Reading safetensors shards through `model.safetensors.index.json`.

Only the files holding tensors that a layer range needs are opened, so a pipeline rank never
touches the other ranks' shards. Every failure names the file and the tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx

from k2mlx.errors import CheckpointError
from k2mlx.loading.sanitize import canonical_name, layer_of

INDEX_FILE = "model.safetensors.index.json"


def safetensors_names(file: Path) -> list[str]:
    """Tensor names in one safetensors file, from its JSON header (no data read)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError("checkpoint file is missing", file=str(file)) from None
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"not a readable safetensors file ({e})", file=str(file)) from e
    return [k for k in header if k != "__metadata__"]


def tensor_index(path: str | Path) -> dict[str, str]:
    """{tensor name: file name} from the index, or from the headers of *.safetensors."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"bad index ({e})", file=str(index)) from e
        return dict(weight_map)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no *.safetensors files and no index", file=str(path / INDEX_FILE))
    out = {}
    for f in files:
        for name in safetensors_names(f):
            out[name] = f.name
    return out


def mla_weights_of(index, args, path=None) -> str:
    """How a checkpoint stores MLA's up-projection: "split" (mlx-lm's per-head
    `self_attn.embed_q` / `unembed_out`) or "kv_b" (`self_attn.kv_b_proj`, the HF layout).
    index: tensor names (a weight map or any iterable). A checkpoint mixing both is an error."""
    split = kv_b = None
    for name in index:
        canon = canonical_name(name, args.num_hidden_layers)
        if canon is None:
            continue
        if split is None and canon.endswith((".self_attn.embed_q.weight", ".self_attn.unembed_out.weight")):
            split = name
        elif kv_b is None and canon.endswith(".self_attn.kv_b_proj.weight"):
            kv_b = name
    if split and kv_b:
        raise CheckpointError(f"the checkpoint mixes two MLA layouts ({split} and {kv_b})",
                              file=str(Path(path) / INDEX_FILE) if path else None, tensor=split)
    return "split" if split else "kv_b"


def folder_mla_weights(path, args) -> str:
    """`mla_weights_of` for a folder (or its config.json) from the index or shard headers only;
    "kv_b" when the folder holds no weights (a bare config.json)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not (folder / INDEX_FILE).exists() and not any(folder.glob("*.safetensors")):
        return "kv_b"
    return mla_weights_of(tensor_index(folder), args, folder)


def is_needed(name: str, args, layers: range) -> bool:
    """Whether the model holding `layers` uses the checkpoint tensor `name`."""
    canon = canonical_name(name, args.num_hidden_layers)
    if canon is None:
        return False
    i = layer_of(canon)
    if i is not None:
        return i in layers
    first, last = layers.start == 0, layers.stop == args.num_hidden_layers
    if canon.startswith("model.embed_tokens."):
        return first or (last and args.tie_word_embeddings)
    if canon.startswith(("model.norm.", "lm_head.")):
        return last
    return True  # unknown top-level tensors: let the strict load report them


def read_tensors(path: str | Path, index: dict[str, str], names: list[str]) -> dict[str, mx.array]:
    """Load the named tensors (lazily, one mx.load per file)."""
    path = Path(path)
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    out = {}
    for fname, wanted in by_file.items():
        file = path / fname
        if not file.exists():
            raise CheckpointError("checkpoint file is missing", file=str(file), tensor=wanted[0])
        try:
            arrays = mx.load(str(file))
        except Exception as e:  # MLX raises RuntimeError/ValueError for truncated files
            raise CheckpointError(f"cannot read safetensors ({e})", file=str(file),
                                  tensor=wanted[0]) from e
        for n in wanted:
            if n not in arrays:
                raise CheckpointError("tensor listed in the index is not in its file",
                                      file=str(file), tensor=n)
            out[n] = arrays[n]
    return out


def source_file(param: str, index: dict[str, str]) -> str | None:
    """The checkpoint file a (sanitized) parameter name came from, for error messages."""
    if param in index:
        return index[param]
    candidates = [param, "language_model." + param]
    if ".switch_mlp." in param:
        base, rest = param.split(".switch_mlp.", 1)
        candidates += [f"{base}.experts.0.{rest}", f"{base}.experts.gate_up_proj",
                       f"{base}.experts.down_proj"]
    # compressed-tensors INT4 stores a quantized module as weight_packed + weight_scale
    for suffix, stored in ((".weight", ".weight_packed"), (".scales", ".weight_scale"), (".biases", ".weight_scale")):
        candidates += [c[: -len(suffix)] + stored for c in list(candidates) if c.endswith(suffix)]
    for c in candidates:
        if c in index:
            return index[c]
        if "language_model." + c in index:
            return index["language_model." + c]
    return None
