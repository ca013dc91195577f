"""The C++ twin's library cache cannot be planted: it lives in a per-user 0700 folder whose
ownership is checked, and a library is loaded only when its content hash is the one recorded
when k2mlx built it. (It used to be a world-writable folder in the system temp dir, with
predictable names, and any .so found there was loaded.)"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile

import numpy as np
import pytest

from k2mlx.errors import K2Error
from k2mlx.kernels import cpp

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the C++ twin")

CONSTS = {"E": 8}


def run_group(inds):
    """The twin's `group` kernel on one row of expert ids -> its `order` output."""
    flat = np.array(inds, np.int32)
    P = flat.size
    order, _, _ = cpp.run("group", CONSTS, [flat, np.array([P], np.int32)], [(P,), (P,), (P, 3)],
                          [np.int32] * 3, 1, 32)
    return order


def library_path(d):
    src = cpp.translation_unit("group", CONSTS, ["int32_t", "int32_t"], ["int32_t"] * 3, "float")
    return d / f"group-{hashlib.sha256(src.encode()).hexdigest()[:16]}.so"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cpp, "_LIBS", {})  # nothing loaded earlier in this process
    d = tmp_path / "kernels"
    monkeypatch.setenv("K2MLX_KERNEL_CACHE", str(d))
    return d


def test_default_folder_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("K2MLX_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("K2MLX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = cpp.cache_dir()
    assert d == tmp_path / "home" / ".cache" / "k2mlx" / "cpp-kernels"
    assert not str(d).startswith(tempfile.gettempdir() + "/k2mlx-cpp")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_an_open_folder_of_ours_is_made_private(cache):
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    assert stat.S_IMODE(os.stat(cpp.cache_dir()).st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the folder to another user")
def test_a_folder_of_another_user_is_refused(cache):
    cache.mkdir()
    os.chown(cache, 65534, 65534)
    with pytest.raises(K2Error, match="belongs to user id 65534"):
        run_group([3, 1, 3, 0])


def test_a_symlinked_folder_is_refused(cache, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    cache.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(K2Error, match="not a symlink"):
        run_group([3, 1, 3, 0])


PLANT = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE* f = fopen("MARKER", "w"); if (f) { fputs("loaded", f); fclose(f); }
}
extern "C" int k2_launch(void** bufs, unsigned n_tg, unsigned tg) { return 0; }
'''


@pytest.mark.parametrize("sidecar", ["none", "wrong-hash", "right-hash-but-group-writable"])
def test_a_planted_library_is_not_loaded(cache, tmp_path, sidecar):
    marker = tmp_path / "planted-ran"
    cache.mkdir(mode=0o700)
    lib = library_path(cache)
    src = tmp_path / "plant.cpp"
    src.write_text(PLANT.replace("MARKER", str(marker)))
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    if sidecar == "wrong-hash":
        (cache / f"{lib.name}.sha256").write_text("0" * 64)
    elif sidecar == "right-hash-but-group-writable":
        (cache / f"{lib.name}.sha256").write_text(digest)
        os.chmod(lib, 0o775)
    order = run_group([3, 1, 3, 0])
    assert not marker.exists(), "the planted library was loaded"
    assert order.tolist() == [3, 1, 0, 2]  # the real kernel ran: pairs grouped by expert
    assert cpp.verified(lib) and hashlib.sha256(lib.read_bytes()).hexdigest() != digest  # rebuilt


def test_a_build_leaves_only_the_library_and_its_hash(cache):
    run_group([1, 1, 0])
    names = sorted(os.listdir(cache))
    assert len(names) == 2 and names[0].endswith(".so") and names[1] == names[0] + ".sha256"
    assert cpp.verified(cache / names[0])
    cpp._LIBS.clear()  # a second process reuses the verified library without building
    mtime = os.stat(cache / names[0]).st_mtime_ns
    run_group([1, 1, 0])
    assert os.stat(cache / names[0]).st_mtime_ns == mtime
