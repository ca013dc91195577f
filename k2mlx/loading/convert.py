"""`k2mlx convert`: any supported checkpoint -> a sharded MLX checkpoint, streamed.

Work goes unit by unit (one decoder layer, the embedding, the head), and inside a layer one
routed-expert projection at a time: each expert is decoded (fp8 dequantized exactly, INT4
repacked, MLX dequantized if its bits change), quantized to its target bits and copied into a
preallocated stacked buffer [E, ...] that goes straight into the output shard. Source arrays
are lazy (`mx.load`) and dropped once used, so peak memory stays near one unit's working set
plus one output shard, not the model. Everything is written into a hidden temporary folder
beside DST that is renamed to DST only after the index and config are complete; on any error
it is removed, so a failed convert leaves nothing half-written: on errors, Ctrl+C, SIGTERM and
SIGHUP. A process killed outright (SIGKILL, power loss) cannot clean up, so every run first
removes the temporary folders beside DST whose process is gone, and says so.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2mlx.errors import CheckpointError, ConfigError, K2Error
from k2mlx.procs import pid_alive

from . import shards
from .formats import FLOAT, Source, decode_module, dequantize, detect, logical_shape, split_name
from .formats import mlx as mlx_format
from .formats.writer import ShardWriter, to_numpy

log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)(\.[a-z_]+)$")
# files that describe the weights themselves and are rewritten, never copied
_REWRITTEN = {"config.json", shards.INDEX}
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32"}


@dataclass
class Result:
    out: Path
    tensors: int
    bytes: int
    shards: int
    quantization: dict | None


def _mx_dtype(name: str):
    import mlx.core as mx

    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    return getattr(mx, _DTYPES[name])


class _Reader:
    """Lazy per-file tensor access; each tensor is handed out once and then forgotten, so the
    data MLX reads for it is freed as soon as the converted result no longer needs it."""

    def __init__(self, src: Path, weight_map: dict):
        self.src, self.weight_map, self.open = src, weight_map, {}

    def take(self, name: str):
        import mlx.core as mx

        fname = self.weight_map[name]
        if fname not in self.open:
            try:
                self.open[fname] = mx.load(str(self.src / fname))
            except Exception as e:
                log.debug("mx.load failed on %s", self.src / fname, exc_info=True)  # the traceback at debug
                raise CheckpointError(f"cannot read shard ({e})", file=str(self.src / fname), tensor=name) from None
        arrays = self.open[fname]
        if name not in arrays:
            raise CheckpointError("the index names a tensor the shard does not hold",
                                  file=str(self.src / fname), tensor=name)
        a = arrays.pop(name)
        if not arrays:
            del self.open[fname]
        return a

    def file(self, name: str) -> str:
        return str(self.src / self.weight_map[name])


def _units(weight_map: dict, num_layers: int) -> list[tuple[str, list[str]]]:
    """Group tensor names into units in file order: 'embed', 'layer.{i}', 'head', 'other'."""
    units: dict[str, list[str]] = {}
    order = {f: i for i, f in enumerate(sorted(set(weight_map.values())))}
    for name in sorted(weight_map, key=lambda n: (order[weight_map[n]], n)):
        i = shards.layer_of(name)
        if i is not None:
            key = f"layer.{i}"
        elif shards._EMBED.match(name):
            key = "embed"
        elif shards._HEAD.match(name):
            key = "head"
        else:
            key = "other"
        units.setdefault(key, []).append(name)
    return list(units.items())


class Converter:
    def __init__(self, src, bits: int = 4, group_size: int = 64, class_bits: dict | None = None,
                 dtype: str = "bfloat16", say=None):
        """say: one-line notices for the user (removed leftovers, a signal); default: log.warning."""
        self.say = say or log.warning
        self.removed: list[Path] = []
        from k2mlx import quantization
        from k2mlx.config import ModelArgs, load_config_file
        from k2mlx.loading.resolve import resolve_model

        quantization.check(bits, group_size, class_bits)  # e.g. group 7 wrote float labelled 4-bit

        self.src = resolve_model(src)  # a folder or a repo id in the local Hugging Face cache
        self.config = load_config_file(self.src)
        self.args = ModelArgs.from_dict(self.config, path=str(self.src / "config.json"))
        self.source: Source = detect(self.config, str(self.src / "config.json"))
        self.weight_map = shards.read_index(self.src)
        self.dtype = _mx_dtype(dtype)
        quantized = (bits and bits < 16) or any(b and b < 16 for b in (class_bits or {}).values())
        self.rule = mlx_format.rule_quantization(bits, group_size, class_bits) if quantized else None
        self._model_shapes()
        self.done: dict[str, tuple] = {}  # produced tensor -> shape
        self.module_params: dict[str, dict | None] = {}

    def _model_shapes(self):
        """Expected float shapes of every parameter and which modules can be quantized,
        from the lazily built model (costs no memory)."""
        from mlx.utils import tree_flatten

        from k2mlx.loading.checkpoint import mla_weights_of
        from k2mlx.model.k2 import Model

        # the source's MLA layout is kept (mlx-lm's embed_q/unembed_out stay split per head)
        model = Model(self.args, mla_weights=mla_weights_of(self.weight_map, self.args, self.src))
        self.expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        self.quantizable = {p: m["weight"].shape[-1] for p, m in model.named_modules()
                            if hasattr(m, "to_quantized") and "weight" in m}
        keep = getattr(model, "cast_predicate", None)  # e.g. the router bias stays float32
        self.keep_float32 = {k for k in self.expected if keep is not None and not keep(k)}

    def validate(self) -> None:
        """Headers of every shard checked before anything is written: a missing or truncated
        file, or an index entry the file does not hold, fails fast with its name."""
        by_file: dict[str, list[str]] = {}
        for n, f in self.weight_map.items():
            by_file.setdefault(f, []).append(n)
        for f, names in sorted(by_file.items()):
            header = shards.read_header(self.src / f, tensor=names[0])
            for n in names:
                if n not in header:
                    raise CheckpointError("the index names a tensor the shard does not hold",
                                          file=str(self.src / f), tensor=n)

    # ---- per-module conversion ----

    def _target(self, path: str):
        """(params for a float source or None, bits the class asks for or None)."""
        if self.rule is None or path not in self.quantizable:
            return None, None
        class_params = mlx_format.rule_params(self.rule, path)  # before the group-size check
        return mlx_format.rule_params(self.rule, path, self.quantizable[path]), class_params

    def _quantize(self, decoded, target):
        """decoded module -> list of (suffix, array) at `target` params (None = float)."""
        import mlx.core as mx

        target, wanted = target
        if decoded[0] == "quant" and wanted is not None:
            _, w, s, b, p = decoded
            if p["bits"] == wanted["bits"] and p.get("mode", "affine") == wanted["mode"]:
                # same bits: keep the source's own codes (INT4 stays bit-exact, its group size too)
                return [(".weight", w), (".scales", s.astype(self.dtype)),
                        (".biases", b.astype(self.dtype))], {**p, "mode": p.get("mode", "affine")}
        if target is None:
            return [(".weight", dequantize(decoded, self.dtype))], None
        w = dequantize(decoded, self.dtype)
        q, s, b = mx.quantize(w, target["group_size"], target["bits"], mode=target["mode"])
        return [(".weight", q), (".scales", s), (".biases", b)], target

    def _check_shape(self, name: str, shape: tuple, file: str):
        want = self.expected.get(name)
        if want is None:
            raise CheckpointError("tensor has no place in the model", file=file, tensor=name)
        if tuple(shape) != want:
            raise CheckpointError(f"shape {tuple(shape)} does not match the model's {want}", file=file, tensor=name)

    def _record(self, path: str, params, parts, writer):
        import mlx.core as mx

        if path in self.module_params and self.module_params[path] != params:
            raise CheckpointError("experts of one layer are quantized differently", tensor=path)
        self.module_params[path] = params
        mx.eval(*[a for _, a in parts])
        for suffix, a in parts:
            writer.add(path + suffix, a)
            self.done[path + suffix] = tuple(a.shape)

    def _experts(self, names: list[str], reader: _Reader, writer: ShardWriter, advance):
        """Per-expert tensors of one layer -> stacked switch_mlp tensors, one projection at a time."""
        import mlx.core as mx

        groups: dict[tuple[str, str], dict[int, dict[str, str]]] = {}
        for n in names:
            m = _EXPERT.match(n)
            groups.setdefault((m.group(1), m.group(3)), {}).setdefault(int(m.group(2)), {})[m.group(4)] = n
        E = self.args.n_routed_experts
        for (prefix, proj), experts in sorted(groups.items()):
            path = f"{prefix}.switch_mlp.{proj}"
            path = path[len("language_model."):] if path.startswith("language_model.") else path
            missing = [e for e in range(E) if e not in experts]
            if missing:
                raise CheckpointError(f"expert {missing[0]} of {E} is missing",
                                      tensor=f"{prefix}.experts.{missing[0]}.{proj}.weight")
            extra = sorted(e for e in experts if e >= E)
            if extra:
                name = next(iter(experts[extra[0]].values()))
                raise CheckpointError(f"expert index {extra[0]} >= n_routed_experts {E}", file=reader.file(name),
                                      tensor=name)
            want = self.expected.get(path + ".weight")
            if want is None:
                raise CheckpointError("tensor has no place in the model", tensor=path + ".weight")
            stacked, params = None, None
            target = self._target(path)
            for e in range(E):
                parts = {suf: reader.take(n) for suf, n in experts[e].items()}
                file = reader.file(next(iter(experts[e].values())))
                base = f"{prefix}.experts.{e}.{proj}"
                decoded = decode_module(base, parts, self.source, file)
                if logical_shape(decoded) != want[1:]:
                    raise CheckpointError(f"shape {logical_shape(decoded)} does not match the model's {want[1:]}",
                                          file=file, tensor=base + ".weight")
                out, p = self._quantize(decoded, target)
                if params is not None and p != params:
                    raise CheckpointError("experts of one projection are quantized differently", file=file, tensor=base)
                params = p
                mx.eval(*[a for _, a in out])
                if stacked is None:  # one buffer per output tensor, filled in place
                    stacked = {s: (np.empty((E, *a.shape), dtype=to_numpy(a)[0].dtype), to_numpy(a)[1]) for s, a in out}
                for s, a in out:
                    stacked[s][0][e] = to_numpy(a)[0]
                del parts, decoded, out
                advance(len(experts[e]))
            self.module_params[path] = params
            for s, (buf, tag) in stacked.items():
                writer.add(path + s, buf, tag)
                self.done[path + s] = buf.shape
            del stacked

    def _unit(self, names: list[str], reader: _Reader, writer: ShardWriter, advance):
        import mlx.core as mx

        experts = [n for n in names if _EXPERT.match(n)]
        if experts:
            self._experts(experts, reader, writer, advance)
        rest = [n for n in names if not _EXPERT.match(n)]
        modules: dict[str, dict[str, str]] = {}
        for n in rest:
            base, suf = split_name(n)
            modules.setdefault(base, {})[suf] = n
        decoded: dict[str, tuple] = {}
        files: dict[str, str] = {}
        for base, parts in modules.items():
            arrays = {suf: reader.take(n) for suf, n in parts.items()}
            files[base] = reader.file(next(iter(parts.values())))
            if set(arrays) - {""}:
                decoded[base] = decode_module(base, arrays, self.source, files[base])
            else:  # a bare tensor (e.g. the router's e_score_correction_bias)
                decoded[base] = ("tensor", arrays[""])
        # name changes sanitize makes (K2.5's language_model. prefix, transformers-5 fused
        # experts, ...) happen on float tensors here, then quantization uses the final names
        floats = {}
        for base in [b for b, d in decoded.items() if d[0] != "quant"]:
            d = decoded.pop(base)  # one reference only, so each source is freed once written
            floats[base if d[0] == "tensor" else base + ".weight"] = d[1]
        floats = _sanitize(floats, self.args)
        for name in list(floats):
            a = floats.pop(name)
            path, suf = split_name(name)
            file = files.get(path) or files.get(name) or next(iter(files.values()), "")
            if suf == ".weight" and path in self.quantizable:
                self._check_shape(name, a.shape, file)
                out, p = self._quantize(("float", a), self._target(path))
                self._record(path, p, out, writer)
            else:
                self._check_shape(name, a.shape, file)
                dt = mx.float32 if name in self.keep_float32 else self.dtype
                self._record_plain(name, a.astype(dt), writer)
        for base in list(decoded):
            d = decoded.pop(base)
            path = base[len("language_model."):] if base.startswith("language_model.") else base
            self._check_shape(path + ".weight", logical_shape(d), files[base])
            out, p = self._quantize(d, self._target(path))
            self._record(path, p, out, writer)
        advance(len(rest))

    def _record_plain(self, name, a, writer):
        import mlx.core as mx

        mx.eval(a)
        writer.add(name, a)
        self.done[name] = tuple(a.shape)

    def quantization(self) -> dict | None:
        if self.rule is None:
            return None
        return mlx_format.config_quantization(self.rule, {p: v for p, v in self.module_params.items()})

    def run(self, dst, shard_bytes: int = 5 * 1024**3, force: bool = False, progress: bool = True) -> Result:
        dst = Path(dst)
        if dst.exists() and not force:
            raise K2Error(f"output folder {dst} already exists (use --force to replace it)")
        if dst.resolve() == self.src.resolve():
            raise K2Error("output folder must differ from the source folder")
        self.validate()
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.removed = remove_stale_partials(dst, self.say)
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        import mlx.core as mx

        old_handlers = _cleanup_on_signals()
        # MLX keeps freed buffers for reuse; converting frees one tensor after another, so a
        # cache would only hold memory the next unit does not need (the output shard is numpy)
        old_cache = mx.set_cache_limit(0)
        try:
            writer = ShardWriter(tmp, shard_bytes)
            reader = _Reader(self.src, self.weight_map)
            units = _units(self.weight_map, self.args.num_hidden_layers)
            total = sum(len(n) for _, n in units)
            with _progress(progress) as bar:
                task = bar.add_task("converting", total=total) if bar else None

                def advance(n):
                    if bar:
                        bar.advance(task, n)

                for key, names in units:
                    if bar:
                        bar.update(task, description=f"converting {key}")
                    if key.startswith("layer.") and int(key[6:]) >= self.args.num_hidden_layers:
                        advance(len(names))  # DeepSeek's MTP layer: not part of the model
                        continue
                    self._unit(names, reader, writer, advance)
            missing = sorted(set(self._expected_outputs()) - set(self.done))
            if missing:
                raise CheckpointError("the checkpoint lacks a tensor the model needs",
                                      file=str(self.src / shards.INDEX), tensor=missing[0])
            writer.finish()
            self._write_config(tmp)
            self._copy_side_files(tmp)
            if dst.exists():
                old = dst.parent / f".{dst.name}.old-{os.getpid()}"
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, _Signalled):
                self.say(f"stopped by {signal.Signals(e.signum).name}; removed the partial output {tmp}")
            raise
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            mx.set_cache_limit(old_cache)
        return Result(dst, len(self.done), writer.total_bytes, len(writer.files), self.quantization())

    def _expected_outputs(self):
        """Float parameter names the output must cover (a quantized module covers its weight)."""
        produced_paths = {split_name(n)[0] for n in self.done}
        for name in self.expected:
            path, suf = split_name(name)
            if suf in (".scales", ".biases"):
                continue
            if name in self.done or (suf == ".weight" and path in produced_paths):
                continue
            yield name

    def _write_config(self, out: Path):
        cfg = dict(self.config)
        for k in ("quantization", "quantization_config"):
            cfg.pop(k, None)
            if isinstance(cfg.get("text_config"), dict):
                cfg["text_config"] = {kk: vv for kk, vv in cfg["text_config"].items() if kk != k}
        q = self.quantization()
        if q is not None:
            cfg["quantization"] = q
        cfg["torch_dtype"] = _DTYPES.get(str(self.dtype).split(".")[-1], "bfloat16")
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    def _copy_side_files(self, out: Path):
        """Tokenizer, chat template, generation config and anything else not a weight."""
        for p in sorted(self.src.iterdir()):
            if p.is_file() and p.suffix != ".safetensors" and p.name not in _REWRITTEN and not p.name.startswith("."):
                shutil.copy2(p, out / p.name)


class _Signalled(SystemExit):
    """SIGTERM / SIGHUP during a convert: unwinds through the cleanup, exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _cleanup_on_signals() -> dict:
    """Turn SIGTERM and SIGHUP into an exception (main thread only), so the temporary folder
    is removed as on any error; returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        raise _Signalled(signum)

    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    return old


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def remove_stale_partials(dst: Path, say=None) -> list[Path]:
    """Remove `.DST.partial-PID` folders beside DST whose process is gone (a convert killed with
    SIGKILL or by a power loss), and `.DST.old-PID` ones once DST exists again (an interrupted
    --force swap: until then the old folder is the only copy). Returns what was removed."""
    say = say or log.warning
    removed = []
    for p in sorted(Path(dst).parent.glob(f".{glob.escape(Path(dst).name)}.*-*")):
        m = _TEMP.match(p.name)
        if m is None or m["name"] != Path(dst).name or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid) or (m["kind"] == "old" and not Path(dst).exists()):
            continue
        shutil.rmtree(p)
        say(f"removed {p}, left behind by an interrupted convert (process {pid} is gone)")
        removed.append(p)
    return removed


def _sanitize(weights: dict, args) -> dict:
    from k2mlx.loading.sanitize import sanitize

    return sanitize(weights, args)


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


def convert(src, dst, bits: int = 4, group_size: int = 64, class_bits: dict | None = None,
            dtype: str = "bfloat16", shard_bytes: int = 5 * 1024**3, force: bool = False,
            progress: bool = True, say=None) -> Result:
    """Convert SRC (any supported format) into a sharded MLX checkpoint at DST.

    bits 16 keeps every weight float (`dtype`); class_bits overrides bits per module class
    ('experts', 'shared', 'attention', 'dense', 'embed', 'head'; 16 = float)."""
    conv = Converter(src, bits, group_size, class_bits, dtype, say=say)
    return conv.run(dst, shard_bytes, force, progress)


__all__ = ["convert", "Converter", "Result", "FLOAT"]
