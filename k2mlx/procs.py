"""Whether a local process is still running (a leaf module: loading, the engine and the cluster
code all ask it about processes that left files behind)."""
from __future__ import annotations

import os


def pid_alive(pid) -> bool:
    """True while process `pid` runs on this machine (also when it belongs to another user)."""
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) is the answer
