"""`k2mlx check`: find what is wrong with a checkpoint before minutes of loading.

Reads config.json, the shard index and every needed shard's safetensors header (never tensor
data), then runs the loader's own steps on shape-only placeholders (lazy `mx.zeros`, never
evaluated, so a 600 GB checkpoint costs a few MB): sanitize (format hooks, expert stacking),
the quantization from config.json, and the strict shape / dtype comparison with the model
(or the pipeline stage owning `layers`). Each fault is one line: a missing or truncated
shard, an index entry its shard lacks, a tensor missing or unexpected for the config, a shape
or dtype mismatch, a quantization config that disagrees with the stored tensors, a missing
tokenizer or chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from k2mlx.errors import CheckpointError, K2Error

GIB = 1024**3
# safetensors dtype tag -> MLX dtype name (MLX loads F8_E4M3 as its uint8 codes)
_TAGS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32", "U32": "uint32",
         "I32": "int32", "I64": "int64", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
         "BOOL": "bool_", "F8_E4M3": "uint8", "F8_E5M2": "uint8", "U64": "uint64"}
MAX_LINES_PER_KIND = 20  # a systematic fault (every layer) is summarised, not printed 60 times


@dataclass
class Report:
    folder: Path | None = None
    faults: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


class _Faults:
    def __init__(self, report: Report):
        self.report, self.counts = report, {}

    def add(self, kind: str, line: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= MAX_LINES_PER_KIND:
            self.report.faults.append(f"{kind}: {line}")

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > MAX_LINES_PER_KIND:
                self.report.faults.append(f"{kind}: ... and {n - MAX_LINES_PER_KIND} more")


def _size(n: int) -> str:
    for unit, s in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= s:
            return f"{n / s:,.2f} {unit}"
    return f"{n} B"


def _folder(spec, layers, faults: _Faults) -> Path | None:
    """The folder to check; a repo id in the cache is checked even when shards are missing."""
    from k2mlx.loading.resolve import cached_snapshot, download_command, hub_cache_dir, is_repo_id, resolve_model

    text = str(spec)
    p = Path(text).expanduser()
    if not p.exists() and is_repo_id(text):
        snap = cached_snapshot(text)
        if snap is None:
            faults.add("missing checkpoint", f"{text} is not in the local Hugging Face cache ({hub_cache_dir()}); "
                                             f"fetch it with: {download_command(text, layers)}")
        return snap
    return resolve_model(spec)


def check(spec, layers: range | str | None = None) -> Report:
    """Check the checkpoint `spec` (folder or cached repo id), or only what `layers` needs
    (a range, or "a:b" / "a:" as on the command line)."""
    import mlx.core as mx

    from k2mlx.loading.download import parse_layers

    spec_layers = layers if isinstance(layers, str) else None
    if spec_layers is not None:
        layers = parse_layers(spec_layers) if not spec_layers.rstrip().endswith(":") else None

    from k2mlx.config import ModelArgs, load_config_file
    from k2mlx.loading.checkpoint import INDEX_FILE, is_needed, mla_weights_of
    from k2mlx.loading.shards import files_for_layers, read_header

    report = Report()
    faults = _Faults(report)
    try:
        folder = _folder(spec, layers, faults)
    except CheckpointError as e:
        faults.add("missing checkpoint", str(e))
        folder = None
    if folder is None:
        faults.close()
        return report
    report.folder = folder
    try:
        config = load_config_file(folder)
        args = ModelArgs.from_dict(config, path=str(folder / "config.json"))
    except K2Error as e:
        faults.add("bad config", str(e))
        faults.close()
        return report
    n = args.num_hidden_layers
    if spec_layers is not None:
        layers = parse_layers(spec_layers, n)
    if layers is not None and not (0 <= layers.start < layers.stop <= n):
        raise K2Error(f"--layers {layers.start}:{layers.stop} is outside the model's {n} layers")
    stage = layers or range(n)
    _check_tokenizer(folder, faults)

    index, index_ok = _read_index(folder, faults)
    if not index_ok:
        faults.close()
        return report
    needed_files = sorted(set(index.values())) if layers is None else files_for_layers(index, layers, num_layers=n,
                                                                                        tied=args.tie_word_embeddings)
    headers: dict[str, dict] = {}
    for f in needed_files:
        path = folder / f
        if not path.is_file():
            faults.add("missing shard", f"{f} (listed in {INDEX_FILE})")
            continue
        try:
            headers[f] = read_header(path)
        except CheckpointError as e:
            kind = "truncated shard" if "truncated" in str(e) or "exceeds the file size" in str(e) else "bad shard"
            faults.add(kind, f"{f}: {str(e).split('; ')[0]}")
    stored: dict[str, dict] = {}  # name -> header info, for tensors whose shard is readable
    for name, f in index.items():
        if f not in headers:
            continue
        info = headers[f].get(name)
        if info is None:
            faults.add("index mismatch", f"{name} is listed in {INDEX_FILE} but not stored in {f}")
        else:
            stored[name] = {**info, "file": f}

    from k2mlx.model.k2 import Model

    try:
        mla = mla_weights_of(index, args, folder)
        model = Model(args, stage, mla_weights=mla)
    except (CheckpointError, ValueError) as e:
        faults.add("bad layout", str(e))
        faults.close()
        return report
    wanted = {k: v for k, v in stored.items() if is_needed(k, args, stage)}
    placeholders = {}
    for k, v in wanted.items():
        if k.endswith(".weight_shape"):
            # its values are data; the loader derives the same (out, in) from the packed shape
            continue
        dt = _TAGS.get(v["dtype"])
        if dt is None:
            faults.add("dtype mismatch", f"{k} in {v['file']} has unsupported dtype {v['dtype']}")
            continue
        placeholders[k] = mx.zeros(v["shape"], getattr(mx, dt))  # lazy: never allocated
    _compare(model, config, args, placeholders, wanted, index, headers, faults)
    faults.close()
    if report.ok:
        report.info = _summary(folder, config, args, mla, index, stored, stage, layers)
    return report


def _check_tokenizer(folder: Path, faults: _Faults) -> None:
    if not (folder / "tiktoken.model").is_file():
        faults.add("missing tokenizer", f"{folder / 'tiktoken.model'} (every command needs it)")
    template = (folder / "chat_template.jinja").is_file()
    cfg_file = folder / "tokenizer_config.json"
    if not template and cfg_file.is_file():
        try:
            template = isinstance(json.loads(cfg_file.read_text()).get("chat_template"), str)
        except (OSError, ValueError, AttributeError) as e:
            faults.add("bad tokenizer config", f"{cfg_file}: {e}")
    if not template:
        faults.add("missing chat template", f"neither {folder / 'chat_template.jinja'} nor a chat_template in "
                                            "tokenizer_config.json")


def _read_index(folder: Path, faults: _Faults) -> tuple[dict, bool]:
    from k2mlx.loading.checkpoint import INDEX_FILE
    from k2mlx.loading.shards import read_header

    idx = folder / INDEX_FILE
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
            return dict(wm), True
        except (OSError, ValueError, KeyError, TypeError) as e:
            faults.add("bad index", f"{idx}: {e}")
            return {}, False
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        faults.add("missing shard", f"no {INDEX_FILE} and no *.safetensors in {folder}")
        return {}, False
    out = {}
    for f in files:
        try:
            out.update({name: f.name for name in read_header(f)})
        except CheckpointError as e:
            kind = "truncated shard" if "truncated" in str(e) or "exceeds the file size" in str(e) else "bad shard"
            faults.add(kind, f"{f.name}: {str(e).split('; ')[0]}")
    return out, bool(out)


def _quantize_as_stored(model, quantization, weights, where, faults: _Faults) -> set:
    """Quantize the model's modules as their stored tensors are (bits and group size read from
    the shapes), reporting each module whose config.json entry says otherwise; returns those."""
    import mlx.nn as nn

    from k2mlx.loading.formats.mlx import module_params, text_quantization

    q = text_quantization(quantization)
    params, flagged = {}, set()
    for path, m in model.named_modules():
        if not hasattr(m, "to_quantized") or f"{path}.scales" not in weights or f"{path}.weight" not in weights:
            continue
        in_dims = m.weight.shape[-1]
        w, s = weights[f"{path}.weight"], weights[f"{path}.scales"]
        bits = w.shape[-1] * 32 // in_dims if w.ndim and (w.shape[-1] * 32) % in_dims == 0 else None
        group = in_dims // s.shape[-1] if s.ndim and s.shape[-1] and in_dims % s.shape[-1] == 0 else None
        want = module_params(q, path)
        got = f"bits {bits}, group size {group}" if bits and group else \
            f"weight {list(w.shape)}, scales {list(s.shape)}"
        if want is None:
            flagged.add(path)
            faults.add("quantization mismatch", f"{path} is stored quantized ({got}) but config.json "
                                                f"{'has no quantization' if not q else 'keeps it float'} "
                                                f"({where(path + '.scales')})")
        elif (want["bits"], want["group_size"]) != (bits, group):
            flagged.add(path)
            faults.add("quantization mismatch", f"config.json says bits {want['bits']}, group size "
                                                f"{want['group_size']} for {path} but its stored tensors are "
                                                f"{got} ({where(path + '.weight')})")
        if bits and group and 2 <= bits <= 8:
            params[path] = {"bits": bits, "group_size": group,
                            "mode": (want or {}).get("mode", (q or {}).get("mode", "affine"))}
    try:
        nn.quantize(model, class_predicate=lambda p, m: params.get(p, False))
    except ValueError as e:  # shapes no MLX quantization can have: reported per tensor below
        faults.add("quantization mismatch", str(e).splitlines()[0])
    return flagged


def _compare(model, config, args, placeholders, wanted, index, headers, faults: _Faults) -> None:
    """The loader's steps on placeholders, then its strict comparison, collecting every fault."""
    from mlx.utils import tree_flatten

    from k2mlx.loading.checkpoint import source_file
    from k2mlx.loading.formats.compressed_tensors import load_quantization
    from k2mlx.loading.sanitize import sanitize

    def where(name):
        return source_file(name, index) or "the index"

    try:
        weights = sanitize(placeholders, args)
        quantization = config.get("quantization") or args.quantization or load_quantization(config)
    except K2Error as e:
        faults.add("bad tensors", str(e))
        return
    flagged = _quantize_as_stored(model, quantization, weights, where, faults)
    params = dict(tree_flatten(model.parameters()))
    for name, p in params.items():
        module = name.rsplit(".", 1)[0]
        if name not in weights:
            f = source_file(name, index)
            if module not in flagged and (f is None or f in headers):  # not already a bad shard
                faults.add("missing tensor", f"{name} (the config needs it; not in {f or 'the index'})")
            continue
        w = weights[name]
        if tuple(w.shape) != tuple(p.shape):
            if module not in flagged:
                faults.add("shape mismatch", f"{name} is {list(w.shape)} in {where(name)}, the model expects "
                                             f"{list(p.shape)}")
        elif _dtype_class(w.dtype) != _dtype_class(p.dtype):
            faults.add("dtype mismatch", f"{name} is {str(w.dtype).split('.')[-1]} in {where(name)}, the model "
                                         f"expects {str(p.dtype).split('.')[-1]}")
    for name in weights:
        if name not in params and name.rsplit(".", 1)[0] not in flagged:
            faults.add("unexpected tensor", f"{name} in {where(name)} (not a parameter of this model)")


def _dtype_class(dt) -> str:
    import mlx.core as mx

    return "float" if mx.issubdtype(dt, mx.floating) else str(dt)


def _summary(folder, config, args, mla, index, stored, stage, layers) -> list[str]:
    from k2mlx.loading.formats import detect
    from k2mlx.loading.sanitize import canonical_name, layer_of

    src = detect(config, str(folder / "config.json"))
    if src.kind == "mlx":
        q = src.quantization
        overrides = sum(1 for v in q.values() if isinstance(v, (dict, bool)))
        bits = f"{q['bits']}-bit, group size {q['group_size']}" + (f", {overrides} per-module overrides"
                                                                   if overrides else "")
    elif src.kind == "compressed-tensors":
        bits = f"INT{src.scheme.bits} routed experts (group size {src.scheme.group_size}), the rest bf16"
    elif src.kind == "fp8":
        bits = f"FP8 e4m3, {src.block[0]}x{src.block[1]} block scales"
    else:
        dtypes = sorted({v["dtype"] for v in stored.values()})
        bits = "float (" + ", ".join(dtypes) + ")"
    per_layer = [0] * args.num_hidden_layers
    other = {"embedding": 0, "norm + lm_head": 0}
    total = 0
    for name, v in stored.items():
        nbytes = v["data_offsets"][1] - v["data_offsets"][0]
        total += nbytes
        canon = canonical_name(name, args.num_hidden_layers)
        if canon is None:
            continue
        i = layer_of(canon)
        if i is not None:
            per_layer[i] += nbytes
        elif "embed_tokens" in canon:
            other["embedding"] += nbytes
        else:
            other["norm + lm_head"] += nbytes
    lines = [f"format: {src.kind} ({args.model_type}, MLA {'embed_q/unembed_out' if mla == 'split' else 'kv_b_proj'})",
             f"bits: {bits}",
             (f"total size: {_size(total)} ({total:,} bytes) in {len(set(index.values()))} shard file(s)"
              if layers is None else f"size of layers {stage.start}:{stage.stop}'s part: {_size(total)} "
              f"({total:,} bytes) in {len({v['file'] for v in stored.values()})} shard file(s)")]
    ends = [f"{k}: {_size(v)}" for k, v in other.items() if v]
    if ends:
        lines.append("; ".join(ends))
    step = max(1, -(-len(stage) // 8))  # at most 8 lines of layer ranges
    for a in range(stage.start, stage.stop, step):
        b = min(a + step, stage.stop)
        lines.append(f"layers {a}:{b}: {_size(sum(per_layer[a:b]))}")
    return lines


__all__ = ["check", "Report"]
