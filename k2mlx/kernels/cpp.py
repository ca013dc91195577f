"""The C++ twin: builds a kernel body with the C++ prelude into a small shared library
(g++, once per kernel and set of constants) and runs it on numpy arrays through ctypes. Used
by the tests and `k2mlx selftest` to check the exact bodies that Metal and CUDA compile, on a
machine with neither; never a runtime path of the model.

Built libraries are cached in a per-user folder ($K2MLX_KERNEL_CACHE, else
$K2MLX_CACHE/cpp-kernels, else ~/.cache/k2mlx/cpp-kernels): 0700, owned by this user (checked).
A library is loaded only when its SHA-256 equals the one recorded when this code built it
(`NAME.so.sha256` beside it); anything else found under its name is rebuilt over, never loaded.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from k2mlx.errors import K2Error
from k2mlx.kernels.cachedir import cache_root, private_dir
from k2mlx.kernels.sources import SPECS, SRC, body, header, ENTRY

log = logging.getLogger(__name__)

_CTYPE = {
    np.dtype(np.float32): "float",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.uint32): "uint32_t",
}
_LIBS: dict[str, ctypes.CDLL] = {}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    d = os.environ.get("K2MLX_KERNEL_CACHE")
    return private_dir(Path(d) if d else cache_root() / "cpp-kernels")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_exclusive(d: Path, suffix: str, data: bytes) -> Path:
    """A new file in `d` (O_EXCL: never through a planted name or symlink) holding `data`."""
    fd, tmp = tempfile.mkstemp(dir=d, suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(tmp)


def verified(lib: Path) -> bool:
    """Whether `lib` is a regular file of this user, writable by no one else, whose content
    hash is the one recorded when it was built here."""
    try:
        st = os.lstat(lib)
        want = (lib.parent / f"{lib.name}.sha256").read_text().strip()
    except (OSError, UnicodeDecodeError):  # missing, a folder, unreadable: not ours
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
        return False
    return bool(re.fullmatch(r"[0-9a-f]{64}", want)) and _sha256(lib) == want


def _compile(cxx: str, d: Path, kernel: str, key: str, src: str, lib: Path) -> ctypes.CDLL:
    """Builds into a new private file, loads that very file, then publishes it (hash first)."""
    fd, tmp = tempfile.mkstemp(dir=d, suffix=f".{kernel}-{key}.so")
    os.close(fd)
    try:
        # the source on stdin: no .cpp file to plant or race, and the same bytes every build
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{SRC}", "-x", "c++", "-o", tmp, "-"]
        r = subprocess.run(cmd, input=src, capture_output=True, text=True)
        if r.returncode != 0:
            raise K2Error(f"{cxx} failed on the {kernel} kernel body:\n{r.stderr[-4000:]}")
        os.chmod(tmp, 0o700)
        digest = _sha256(Path(tmp))
        handle = ctypes.CDLL(tmp)
        # hash first: a reader that sees the new library also sees its hash; one that looks
        # between the renames (or after a parallel build) finds a mismatch and builds its own
        os.replace(_write_exclusive(d, ".sha256", digest.encode()), lib.parent / f"{lib.name}.sha256")
        os.replace(tmp, lib)
        return handle
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def translation_unit(kernel: str, constants: dict[str, int], in_types: list[str],
                     out_types: list[str], t_type: str | None) -> str:
    spec = SPECS[kernel]
    params = [f"const {t}* {n}" for t, n in zip(in_types, spec.inputs)]
    params += [f"{t}* {n}" for t, n in zip(out_types, spec.outputs)]
    consts = "".join(f"constexpr int {k} = {int(constants[k])};\n" for k in spec.constants)
    if spec.typed:
        consts += f"using T = {t_type};\n"
    casts = [f"({t}*)bufs[{i}]" for i, t in enumerate(["const " + t for t in in_types] + out_types)]
    return (
        f"{header('cpp')}\n"
        f"namespace k_{kernel} {{\n{consts}\n"
        f"static void body({', '.join(params)}) {{\n{ENTRY['cpp']}{body(kernel)}\n}}\n}}\n"
        f'extern "C" int k2_launch(void** bufs, unsigned n_tg, unsigned tg_size) {{\n'
        f"  return k2emu::launch(n_tg, 1, 1, tg_size, [&]() {{ k_{kernel}::body({', '.join(casts)}); }});\n"
        f"}}\n"
    )


def build(kernel: str, constants: dict[str, int], in_types, out_types, t_type=None) -> ctypes.CDLL:
    src = translation_unit(kernel, constants, list(in_types), list(out_types), t_type)
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    if key in _LIBS:
        return _LIBS[key]
    cxx = compiler()
    if cxx is None:
        raise K2Error("no C++ compiler (g++) found: cannot build the C++ twin of the kernels")
    d = cache_dir()
    lib = d / f"{kernel}-{key}.so"
    if verified(lib):
        handle = ctypes.CDLL(str(lib))
    else:
        if os.path.lexists(lib):
            log.warning("k2mlx: %s does not match the hash recorded when it was built; rebuilding it", lib)
        handle = _compile(cxx, d, kernel, key, src, lib)
    handle.k2_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_uint]
    handle.k2_launch.restype = ctypes.c_int
    _LIBS[key] = handle
    return handle


def run(kernel: str, constants: dict[str, int], inputs: list[np.ndarray],
        output_shapes: list[tuple], output_dtypes: list, n_tg: int, tg_size: int,
        t_dtype=np.float32) -> list[np.ndarray]:
    """Runs `n_tg` threadgroups of `tg_size` threads of one kernel body on the CPU."""
    ins = [np.ascontiguousarray(a) for a in inputs]
    outs = [np.empty(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
    for o in outs:  # like GPU memory, outputs start as garbage (NaN / -1) not zeros
        o.view(np.uint8)[...] = 0xFF
    lib = build(
        kernel, constants, [_CTYPE[a.dtype] for a in ins], [_CTYPE[o.dtype] for o in outs],
        _CTYPE[np.dtype(t_dtype)],
    )
    ptrs = (ctypes.c_void_p * (len(ins) + len(outs)))(*[a.ctypes.data for a in ins + outs])
    if lib.k2_launch(ptrs, n_tg, tg_size) != 0:
        raise K2Error(f"{kernel} kernel: a barrier was not reached by every thread of a threadgroup")
    return outs
