"""The persistent prefix cache: latent KV caches of prompt prefixes, on disk, in token blocks.

A prefix is stored as a chain of blocks of `block` tokens (256 by default: about 18 MB per block
for full K2 in bf16). Block i's file is named by a hash chained over the model's identity and
every token up to the end of block i, so:
- a lookup walks the query's chain hashes and stops at the first block that is not on disk: the
  longest stored common prefix, at block granularity, with no index to keep in sync;
- prefixes shared by many conversations (system prompt plus tools) are stored once;
- a later turn writes only the blocks it adds;
- another model, quantization or layer range hashes differently and never hits.

Each file is a safetensors file (one `k.{layer}` [1, 1, block, kv_lora_rank] and `v.{layer}`
[1, 1, block, qk_rope_head_dim] tensor per owned layer) whose metadata repeats the identity, the
chain hash, the block's tokens and a BLAKE2b digest of the data. A file that is truncated, garbled,
foreign or does not match its name is removed with a warning and counts as a miss. Writes go to
an exclusive temporary file in the same folder and are renamed into place, so a process killed
mid-write leaves only a dot-file that is never loaded (and is removed by the next process once its
writer is gone). Files are evicted least recently used (mtime, refreshed on every hit) once the
folder exceeds its budget. All writing happens on one background thread, off the request path.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from k2mlx.procs import pid_alive

log = logging.getLogger(__name__)

FORMAT = "k2mlx-prompt-cache/1"
SUFFIX = ".kvblock"
_TMP_PREFIX = ".tmp-"
_MAX_HEADER = 1 << 20  # a block's header is a few KB; anything bigger is not ours
_DTYPES = {"F32": (np.float32, "float32"), "F16": (np.float16, "float16"), "BF16": (np.uint16, "bfloat16")}


def default_dir() -> Path:
    base = os.environ.get("K2MLX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "k2mlx")
    return Path(base) / "prompt-cache"


def model_identity(path: str | os.PathLike | None, args, layer_range, quantization=None, model=None,
                   tag: str = "") -> str:
    """A hash of everything that changes the cached values: the config, the weight index and
    shard sizes, the quantization, the layers this process owns and (given `model`) the name,
    shape and dtype of every parameter, which also tells a model quantized on load apart.
    `tag`, when given, is hashed in too (a tensor-parallel rank's "tensor rank r of N": its
    blocks are its own, even in a folder its peers share)."""
    h = hashlib.sha256(FORMAT.encode())
    if model is not None:
        from mlx.utils import tree_flatten

        for name, arr in tree_flatten(model.parameters()):
            h.update(f"{name}:{tuple(arr.shape)}:{arr.dtype};".encode())
    if path is not None:
        p = Path(path)
        for name in ("config.json", "model.safetensors.index.json"):
            f = p / name
            h.update(name.encode() + (f.read_bytes() if f.is_file() else b"-"))
        for f in sorted(p.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(repr(sorted(vars(args).items()) if args is not None else None).encode())
    h.update(json.dumps(quantization, sort_keys=True, default=str).encode())
    h.update(f"layers {layer_range.start}:{layer_range.stop}".encode())
    if tag:  # only then: an untagged identity stays what it was, so stored blocks keep hitting
        h.update(f"tag {tag}".encode())
    return h.hexdigest()


def chain_hashes(identity: str, tokens, block: int) -> list[str]:
    """Hash of (identity, tokens[: (i + 1) * block]) for every whole block i."""
    h = hashlib.sha256(identity.encode())
    arr = np.asarray(tokens, dtype=np.int64)
    out = []
    for i in range(len(arr) // block):
        h.update(arr[i * block:(i + 1) * block].tobytes())
        out.append(h.copy().hexdigest()[:40])
    return out


def kv_arrays(cache) -> list[tuple] | None:
    """Per layer (keys, values) [1, 1, T, D] of an extracted per-sequence cache, or None when a
    layer is not a plain local KV cache (a pipeline's stand-in for another rank's layer)."""
    from k2mlx.mlxlm_adapter import kv_of

    out = []
    for c in cache:
        kv = kv_of(c)
        if kv is None:
            return None
        out.append(kv)
    return out


def kv_caches(kv: list[tuple]) -> list:
    """Per-layer caches holding exactly these (keys, values). They have no spare capacity, so the
    first new token makes new arrays: two caches built from the same arrays never write into
    each other."""
    from k2mlx.mlxlm_adapter import kv_cache_holding

    return [kv_cache_holding(keys, values) for keys, values in kv]


class BadBlock(Exception):
    """A block file that must not be used (the message says why)."""


def host_copy(arr) -> tuple[str, tuple, bytes]:
    """(safetensors dtype, shape, bytes) of an evaluated array. Runs on the thread that owns the
    array's stream (MLX 0.32 evaluates lazy arrays only on the thread that built them), so the
    writer thread never calls MLX."""
    import mlx.core as mx

    if arr.dtype == mx.bfloat16:
        return "BF16", tuple(arr.shape), np.asarray(arr.view(mx.uint16)).tobytes()
    if arr.dtype == mx.float16:
        return "F16", tuple(arr.shape), np.asarray(arr).tobytes()
    return "F32", tuple(arr.shape), np.asarray(arr.astype(mx.float32)).tobytes()


def encode_block(identity: str, chain: str, tokens, layers: list[int], kv: list[tuple]) -> bytes:
    """One block file's bytes. kv[i] = (keys, values) of layer layers[i], each a `host_copy`
    of a [1, 1, block, D] array."""
    header, chunks, offset = {}, [], 0
    for layer, (k, v) in zip(layers, kv):
        for name, (dtype, shape, data) in ((f"k.{layer}", k), (f"v.{layer}", v)):
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
            chunks.append(data)
            offset += len(data)
    digest = hashlib.blake2b(digest_size=16)
    for c in chunks:
        digest.update(c)
    header["__metadata__"] = {
        "format": FORMAT, "identity": identity, "chain": chain, "layers": ",".join(map(str, layers)),
        "tokens": ",".join(str(int(t)) for t in tokens), "digest": digest.hexdigest(),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def decode_block(data: bytes, identity: str, chain: str, tokens, layers: list[int]) -> list[tuple]:
    """-> [(keys, values)] per layer, as mx arrays. Raises BadBlock."""
    import mlx.core as mx

    if len(data) < 8:
        raise BadBlock("truncated header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise BadBlock("bad header length")
    try:
        header = json.loads(data[8:8 + n])
        meta = header.pop("__metadata__")
    except (ValueError, KeyError, TypeError) as e:
        raise BadBlock(f"unreadable header ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadBlock("not a k2mlx prompt-cache block")
    if meta.get("identity") != identity:
        raise BadBlock("written by another model")
    if meta.get("chain") != chain or meta.get("tokens") != ",".join(str(int(t)) for t in tokens):
        raise BadBlock("holds other tokens than its name says")
    if meta.get("layers") != ",".join(map(str, layers)):
        raise BadBlock("holds other layers")
    body = memoryview(data)[8 + n:]
    try:
        spans = {name: (t["dtype"], tuple(t["shape"]), *t["data_offsets"]) for name, t in header.items()}
    except (KeyError, TypeError, ValueError):
        raise BadBlock("malformed tensor entry") from None
    if max((e for *_, e in spans.values()), default=0) != len(body):
        raise BadBlock("data length does not match the header (truncated or padded)")
    if hashlib.blake2b(body, digest_size=16).hexdigest() != meta.get("digest"):
        raise BadBlock("data digest mismatch (garbled)")
    out = []
    for layer in layers:
        pair = []
        for name in (f"k.{layer}", f"v.{layer}"):
            if name not in spans:
                raise BadBlock(f"tensor {name} missing")
            dtype, shape, s, e = spans[name]
            if dtype not in _DTYPES or not (0 <= s <= e <= len(body)) or len(shape) != 4 \
                    or shape[2] != len(tokens):
                raise BadBlock(f"tensor {name} malformed")
            np_dtype, mx_name = _DTYPES[dtype]
            if int(np.prod(shape)) * np.dtype(np_dtype).itemsize != e - s:
                raise BadBlock(f"tensor {name} has the wrong size")
            a = mx.array(np.frombuffer(body[s:e], dtype=np_dtype).reshape(shape))
            pair.append(a.view(getattr(mx, mx_name)) if mx_name == "bfloat16" else a)
        out.append(tuple(pair))
    return out


class DiskPrefixCache:
    """Blocks of latent KV cache on disk for one model identity (see the module docstring).

    `lookup(tokens, beyond)` runs on the model thread and returns the per-layer (keys, values) of
    the longest stored prefix longer than `beyond` tokens; `save(tokens, kv)` queues the blocks
    not yet stored for the writer thread."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, identity: str, layers: list[int],
                 block: int = 256, max_pending: int = 256, width: int = 1 << 12):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.root = Path(directory).expanduser()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder = self.root / identity[:24]
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes, self.identity, self.layers, self.block = int(max_bytes), identity, list(layers), block
        # keys + values of `width` values per token and layer, in float32 at most
        self.max_file = 8 + _MAX_HEADER + 4 * block * width * len(self.layers)
        self.hits = self.misses = self.loaded_tokens = self.written_blocks = self.bad_files = 0
        self.write_seconds = self.read_seconds = 0.0
        self.written_bytes = self.read_bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._known: set[str] = set()  # chain hashes this process wrote or saw on disk
        self._remove_stale_temps()
        self._size = self._scan_size()
        self._writer = threading.Thread(target=self._write_loop, name="k2mlx-prompt-cache", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ reading (model thread)
    def _path(self, chain: str) -> Path:
        return self.folder / (chain + SUFFIX)

    def lookup(self, tokens, beyond: int = 0, limit: int | None = None):
        """-> (n, [(keys [1, 1, n, Dk], values [1, 1, n, Dv]) per layer]) for the longest stored
        prefix of at most `limit` tokens, or (0, None) when none is longer than `beyond`."""
        t0 = time.perf_counter()
        parts = self.read_blocks(tokens, beyond, limit)
        if not parts:
            self.misses += 1
            return 0, None
        layers = self.join(parts)
        n = len(parts) * self.block
        self.read_seconds += time.perf_counter() - t0
        self.hits += 1
        self.loaded_tokens += n
        return n, layers

    def read_blocks(self, tokens, beyond: int = 0, limit: int | None = None) -> list:
        """The blocks of the longest stored prefix of at most `limit` tokens, read and checked:
        per block, per owned layer (keys, values) [1, 1, block, D]; [] when that prefix is not
        longer than `beyond` tokens. Counts neither a hit nor a miss (a pipeline decides that
        once every rank has answered)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        chains = chain_hashes(self.identity, tokens[:limit], self.block)
        n_blocks = 0
        while n_blocks < len(chains) and self._path(chains[n_blocks]).is_file():
            n_blocks += 1
        if n_blocks * self.block <= beyond:
            return []
        parts = []
        for i in range(n_blocks):
            kv = self._read(chains[i], tokens[i * self.block:(i + 1) * self.block])
            if kv is None:
                break
            parts.append(kv)
        return parts if len(parts) * self.block > beyond else []

    def join(self, parts: list) -> list[tuple]:
        """Blocks (as `read_blocks` returns them) -> per layer (keys, values) [1, 1, n, D], evaluated."""
        import mlx.core as mx

        layers = [(mx.concatenate([p[j][0] for p in parts], axis=2), mx.concatenate([p[j][1] for p in parts], axis=2))
                  for j in range(len(self.layers))]
        mx.eval([x for kv in layers for x in kv])
        return layers

    def restore(self, tokens, beyond: int = 0, limit: int | None = None, copies: int = 1):
        """-> (n, [`copies` independent per-layer cache lists holding the longest stored prefix])
        or (0, []) (see `lookup`). The prefix cache's entry point (a pipeline's version also
        restores the other ranks' layers: distributed/disk_pipeline.py)."""
        n, kv = self.lookup(tokens, beyond, limit)
        return (n, [kv_caches(kv) for _ in range(copies)]) if kv is not None else (0, [])

    def _read(self, chain: str, tokens):
        path = self._path(chain)
        try:
            # never follow a planted link; never read more than a block can be
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                if os.fstat(f.fileno()).st_size > self.max_file:
                    raise BadBlock("larger than any block")
                data = f.read(self.max_file + 1)
            kv = decode_block(data, self.identity, chain, tokens, self.layers)
        except FileNotFoundError:  # evicted by another process sharing the folder
            self._known.discard(chain)
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink where a block should be
                self.bad_files += 1
                log.warning("prompt cache: removing %s: a symbolic link", path)
                self._unlink(path)
                self._known.discard(chain)
            else:
                log.warning("prompt cache: cannot read %s", path, exc_info=True)
            return None
        except BadBlock as e:
            self.bad_files += 1
            log.warning("prompt cache: removing %s: %s", path, e)
            self._unlink(path)
            self._known.discard(chain)
            return None
        self.read_bytes += len(data)
        try:
            os.utime(path)  # least recently used is judged by mtime
        except OSError:
            pass  # removed meanwhile; the data is already read and checked
        return kv

    # ------------------------------------------------------------------ writing
    def save(self, tokens, kv: list[tuple]) -> int:
        """Queue the whole blocks of `tokens` not yet on disk. kv: per owned layer (keys, values)
        [1, 1, >= len(tokens), D], aligned with tokens. -> number of blocks queued. Runs on the
        thread that owns the arrays (the model thread): it slices and copies the new blocks to host
        memory; the writer thread does the encoding and the I/O."""
        import mlx.core as mx

        n = min(len(tokens), *(int(k.shape[2]) for k, _ in kv)) if kv else 0
        chains = chain_hashes(self.identity, tokens[:n], self.block)
        jobs = []
        for i, chain in enumerate(chains):
            if chain in self._known or self._path(chain).is_file():
                self._known.add(chain)
                continue
            s, e = i * self.block, (i + 1) * self.block
            blk = [(k[:, :, s:e, :], v[:, :, s:e, :]) for k, v in kv]
            jobs.append((chain, list(tokens[s:e]), blk))
        if not jobs:
            return 0
        mx.eval([x for _, _, blk in jobs for kv_ in blk for x in kv_])
        jobs = [(c, t, [(host_copy(k), host_copy(v)) for k, v in blk]) for c, t, blk in jobs]
        queued = 0
        for job in jobs:
            try:
                self._queue.put_nowait(job)
                self._known.add(job[0])
                queued += 1
            except queue.Full:
                log.warning("prompt cache: writer is behind; %d blocks not saved", len(jobs) - queued)
                break
        return queued

    def save_cache(self, tokens, cache) -> int:
        """`save` of a whole per-sequence cache (nothing when some layer is not a local KV cache)."""
        kv = kv_arrays(cache)
        return self.save(tokens, kv) if kv is not None else 0

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued block is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 60.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._writer.join(timeout=5)

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(*job)
            except Exception:  # one block lost; the cache stays consistent (nothing half-written loads)
                log.exception("prompt cache: writing a block failed")
                self._known.discard(job[0])
            finally:
                self._queue.task_done()

    def _write(self, chain: str, tokens, kv) -> None:
        t0 = time.perf_counter()
        data = encode_block(self.identity, chain, tokens, self.layers, kv)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=".part", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(chain))
        except BaseException:
            self._unlink(Path(tmp))
            raise
        self.write_seconds += time.perf_counter() - t0
        self.written_bytes += len(data)
        self.written_blocks += 1
        self._size += len(data)
        if self._size > self.max_bytes:
            self._evict()

    # ------------------------------------------------------------------ housekeeping
    def _files(self):
        for sub in self.root.iterdir() if self.root.is_dir() else ():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.suffix == SUFFIX and not f.name.startswith("."):
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue
                    yield f, st

    def _scan_size(self) -> int:
        return sum(st.st_size for _, st in self._files())

    def _evict(self) -> None:
        """Oldest blocks first, across every model in the folder, down to 90% of the budget.
        A prefix's blocks are touched together on a hit, so leaves go before their ancestors."""
        files = sorted(self._files(), key=lambda fs: fs[1].st_mtime)
        total = sum(st.st_size for _, st in files)
        target = int(self.max_bytes * 0.9)
        for f, st in files:
            if total <= target:
                break
            self._unlink(f)
            self._known.discard(f.stem)
            total -= st.st_size
        self._size = total

    def _remove_stale_temps(self) -> None:
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.glob(_TMP_PREFIX + "*"):
                try:
                    pid = int(f.name[len(_TMP_PREFIX):].split("-", 1)[0])
                except ValueError:
                    pid = -1
                if pid <= 0 or (pid != os.getpid() and not pid_alive(pid)):
                    log.info("prompt cache: removing %s, left by a process that is gone", f)
                    self._unlink(f)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("prompt cache: cannot remove %s", path, exc_info=True)

    @property
    def nbytes(self) -> int:
        return self._size

    def stats(self) -> dict:
        return {"dir": str(self.folder), "bytes": self._size, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "loaded_tokens": self.loaded_tokens, "written_blocks": self.written_blocks,
                "bad_files": self.bad_files}


def open_prompt_cache(model, path, directory=None, max_gb: float = 20.0, block: int = 256, tag: str = ""):
    """The disk cache for a loaded model (None when max_gb <= 0). Raises OSError when the
    folder cannot be made. `tag`: see `model_identity`."""
    if max_gb <= 0:
        return None
    args = model.args
    ident = model_identity(path, args, model.layer_range, model=model, tag=tag)
    width = int(getattr(args, "kv_lora_rank", 0) + getattr(args, "qk_rope_head_dim", 0)) or 1 << 12
    return DiskPrefixCache(directory or default_dir(), int(max_gb * (1 << 30)), ident, list(model.layer_range),
                           block=block, width=width)
