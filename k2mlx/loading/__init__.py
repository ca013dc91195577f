"""Loading a K2 checkpoint folder into a `Model` (or one pipeline stage of it).

`load(path, layers, dtype) -> (model, tokenizer)`; `load_model` (model only); `load_config`
(config.json as a dict). `path` goes through `resolve.resolve_model` (a folder, a Hugging Face
repo id in the local cache, or None for the embedded k2-nano). Order (mlx-lm's convention):
read config -> build the model in the checkpoint's MLA layout (kv_b_proj, or mlx-lm's
embed_q/unembed_out) -> read the needed tensors -> `sanitize` -> apply `quantization` from the
config with per-module overrides -> shape check -> `load_weights(strict=True)`.
"""
from __future__ import annotations

from pathlib import Path

from k2mlx.errors import CheckpointError

__all__ = ["load", "load_model", "load_config", "load_args", "preflight"]


def load_config(path: str | Path) -> dict:
    """config.json of a checkpoint folder as a dict."""
    from k2mlx.config import load_config_file

    return load_config_file(path)


def load_args(path: str | Path):
    """`ModelArgs` of a checkpoint folder."""
    from k2mlx.config import ModelArgs

    p = Path(path)
    return ModelArgs.from_dict(load_config(p), path=str(p / "config.json"))


def _resolve(path, layers=None) -> Path:
    """A folder, a Hugging Face repo id in the local cache, or None (k2-nano): see resolve.py."""
    from k2mlx.loading.resolve import resolve_model

    if layers is not None and not isinstance(layers, range):
        layers = range(min(layers), max(layers) + 1)
    return resolve_model(path, layers)


def quantize_model(model, quantization: dict | None, weights: dict) -> None:
    """Swap linears for quantized ones where the checkpoint has `.scales` (or the config says
    so per module), before loading. `quantization`: {bits, group_size, [mode], path: {...}|False}."""
    if not quantization:
        return
    import mlx.nn as nn

    from k2mlx.loading.formats.mlx import text_quantization

    quantization = text_quantization(quantization)

    def predicate(p, m):
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized"):
            return False
        return f"{p}.scales" in weights

    try:
        nn.quantize(
            model,
            group_size=quantization.get("group_size"),
            bits=quantization.get("bits"),
            mode=quantization.get("mode", "affine"),
            class_predicate=predicate,
        )
    except ValueError as e:  # e.g. a group size the module's input size is not a multiple of
        raise CheckpointError(f"the quantization in config.json does not fit this model ({str(e).splitlines()[0]}); "
                              "`k2mlx check` lists the modules it disagrees with", file="config.json") from None


def _check_and_cast(model, weights: dict, index: dict, path: Path, dtype) -> list:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from k2mlx.loading.checkpoint import INDEX_FILE, source_file

    def where(name):
        f = source_file(name, index)
        return str(path / f) if f else str(path / INDEX_FILE)

    params = dict(tree_flatten(model.parameters()))
    for name, p in params.items():
        if name not in weights:
            raise CheckpointError("tensor missing from the checkpoint", file=where(name), tensor=name)
        w = weights[name]
        if tuple(w.shape) != tuple(p.shape):
            raise CheckpointError(
                f"shape {list(w.shape)} does not match the model's {list(p.shape)}",
                file=where(name), tensor=name,
            )
    for name in weights:
        if name not in params:
            raise CheckpointError("unexpected tensor (not a parameter of this model)",
                                  file=where(name), tensor=name)
    out = []
    for name, w in weights.items():
        # the router's correction bias stays float32: expert selection is sensitive to it
        if dtype is not None and mx.issubdtype(w.dtype, mx.floating) and "e_score_correction_bias" not in name:
            w = w.astype(dtype)
        out.append((name, w))
    return out


def load_model(path=None, layers=None, dtype=None, lazy: bool = False, bits: int | None = None,
               group_size: int = 64, class_bits: dict | None = None, moe_path: str | None = None):
    """Build and load the model (or the pipeline stage holding `layers`) from a folder.

    bits/group_size/class_bits: quantize float weights (bf16, or FP8 after its exact
    dequantization) on load; modules stored quantized keep their own codes. moe_path:
    auto (default; K2MLX_MOE_PATH when None) | switch | reference | kernel, decided once here
    by k2mlx.kernels.policy."""
    import mlx.core as mx

    from k2mlx.kernels.policy import configure, requested_path

    moe_path = requested_path(moe_path)  # a bad value fails here, before minutes of loading

    from k2mlx.loading.checkpoint import is_needed, mla_weights_of, read_tensors, tensor_index
    from k2mlx.loading.formats.compressed_tensors import load_quantization
    from k2mlx.loading.formats.mlx import quantize_weights, rule_quantization
    from k2mlx.loading.sanitize import sanitize
    from k2mlx.model.k2 import Model

    path = _resolve(path, layers)
    config = load_config(path)
    args = load_args(path)
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    index = tensor_index(path)
    # the MLA weight layout (kv_b_proj, or mlx-lm's embed_q/unembed_out) is the checkpoint's
    model = Model(args, layers, mla_weights=mla_weights_of(index, args, path))
    names = [n for n in index if is_needed(n, args, model.layer_range)]
    weights = sanitize(read_tensors(path, index, names), args)
    quantization = config.get("quantization") or args.quantization or load_quantization(config)
    if bits is not None and bits < 16:  # e.g. FP8 -> 4-bit: quantize the float weights on load
        if dtype is not None:  # quantize from the requested dtype, as convert does
            weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating)
                       and "e_score_correction_bias" not in k else v for k, v in weights.items()}
        rule = rule_quantization(bits, group_size, class_bits)
        weights, quantization = quantize_weights(weights, model, rule, quantization)
    quantize_model(model, quantization, weights)
    model.load_weights(_check_and_cast(model, weights, index, path, dtype), strict=True)
    if not lazy:
        _materialize(model)
    model.eval()
    configure(model, moe_path)
    return model


def _materialize(model) -> None:
    """Read the weights now, layer by layer, with a progress bar for big checkpoints."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    parts = [m for m in (model.model.get("embed_tokens"), model.model.get("norm"),
                         model.get("lm_head")) if m is not None] + list(model.layers)
    if total < 2**30:
        mx.eval(model.parameters())
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"loading {total / 2**30:.1f} GiB", total=len(parts))
        for m in parts:
            mx.eval(m.parameters())
            bar.advance(task)


def preflight(path=None, layers=None) -> Path:
    """What `load` checks before reading any weight, for a command that loads later (e.g. in a
    UI thread): the resolved folder, a readable config and a tokenizer. Returns the folder."""
    path = _resolve(path, layers)
    load_args(path)
    if not (path / "tiktoken.model").is_file():
        raise CheckpointError("no tokenizer vocabulary (tiktoken.model) in the model folder",
                              file=str(path / "tiktoken.model"))
    return path


def load(path=None, layers=None, dtype=None, lazy: bool = False, **quantize):
    """`model, tokenizer = load(path, layers=range(a, b))`. path: a folder, a Hugging Face repo
    id in the local cache, or None for the embedded k2-nano. A folder without a tokenizer
    (`tiktoken.model`) is a CheckpointError naming the file, raised before any weight is read
    (`load_model` loads the model alone). `quantize`: bits, group_size, class_bits, as in
    load_model."""
    from k2mlx.mlxlm_adapter import require
    from k2mlx.tokenizer import load_tokenizer

    require()  # inference runs on mlx-lm's internals: a renamed one fails here, before the weights load
    path = _resolve(path, layers)
    tokenizer = load_tokenizer(path)  # first: a missing tokenizer fails before minutes of loading
    model = load_model(path, layers=layers, dtype=dtype, lazy=lazy, **quantize)
    return model, tokenizer
