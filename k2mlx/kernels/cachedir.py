"""Where k2mlx keeps what it computes once per machine: $K2MLX_CACHE, else ~/.cache/k2mlx.
A leaf module (no k2mlx imports besides errors), shared by the MoE-path cache and the C++ twin."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from k2mlx.errors import K2Error


def cache_root() -> Path:
    return Path(os.environ.get("K2MLX_CACHE") or Path.home() / ".cache" / "k2mlx")


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can use: created 0700; an existing one must be a real
    folder (not a symlink) owned by this user, and loses any group/other permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise K2Error(f"{path} must be a folder, not a symlink or file: refusing to use it")
    if st.st_uid != os.geteuid():
        raise K2Error(f"{path} belongs to user id {st.st_uid}, not to you: refusing to use it "
                      "(remove it, or set K2MLX_KERNEL_CACHE to a folder of your own)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path
