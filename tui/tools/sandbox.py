"""run_shell's OS sandbox and process control.

Linux: bubblewrap (`bwrap`). The whole file system is mounted read-only, the workspace is bound
read-write, /tmp, /var/tmp and /dev/shm are private and thrown away after the command, no
capabilities, new user/pid/ipc/uts/cgroup/network namespaces (the network namespace has only
its own loopback unless the user allows the network for that one command). The pid namespace
ends with the command: when the shell exits or is killed, every process it started dies too,
`setsid` or not.

macOS: Seatbelt (`sandbox-exec`) with a profile that denies every file write outside the
workspace and a private temp folder, and all network unless allowed for that command.

Neither confines reads: a command can read whatever the user can. Without either tool there is
no sandbox (`Sandbox.kind == "none"`) and the app asks before every command.

Output is captured while it is read, bounded (head and tail kept), and a command that outlives
its timeout is killed with its process group, its pid namespace (Linux sandbox) or, without a
sandbox on Linux, every process that still carries the command's private environment token."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

log = logging.getLogger(__name__)

TOKEN_VAR = "K2MLX_RUN_TOKEN"
# what a command inherits from the app that it has no business seeing
_SECRET_ENV = ("K2MLX_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")

SEATBELT_PROFILE = """(version 1)
(allow default)
(deny file-write*)
(allow file-write*
    (subpath (param "WORKSPACE"))
    (subpath (param "PRIVATE_TMP"))
    (literal "/dev/null") (literal "/dev/zero") (literal "/dev/tty") (literal "/dev/dtracehelper")
    (regex #"^/dev/fd/[0-9]+$") (regex #"^/dev/ttys[0-9]+$"))
"""
SEATBELT_NO_NETWORK = "(deny network*)\n"  # all sockets, DNS (mDNSResponder) included


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "bubblewrap", "seatbelt" or "none"
    program: str = ""
    reason: str = ""  # why there is none

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        """One line for the approval card and /tools."""
        if self.kind == "bubblewrap":
            return "sandbox: bubblewrap (writes: workspace and a private /tmp only; network off unless allowed)"
        if self.kind == "seatbelt":
            return "sandbox: Seatbelt (writes: workspace and a private temp folder only; network off unless allowed)"
        return f"NO SANDBOX ({self.reason}): the command runs with your full permissions"

    def argv(self, command: str, *, workspace: str, cwd: str, private_tmp: str, network: bool) -> list[str]:
        if self.kind == "bubblewrap":
            return [self.program, "--die-with-parent", "--new-session", "--unshare-all",
                    *(["--share-net"] if network else []), "--cap-drop", "ALL",
                    "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                    "--tmpfs", "/tmp", "--tmpfs", "/var/tmp",
                    "--bind", workspace, workspace, "--chdir", cwd, "--setenv", "TMPDIR", "/tmp",
                    "--", "/bin/sh", "-c", command]
        if self.kind == "seatbelt":
            profile = SEATBELT_PROFILE + ("" if network else SEATBELT_NO_NETWORK)
            return [self.program, "-p", profile, "-D", f"WORKSPACE={workspace}", "-D", f"PRIVATE_TMP={private_tmp}",
                    "/bin/sh", "-c", command]
        return ["/bin/sh", "-c", command]


NONE = Sandbox("none", reason="no sandbox tool")


@functools.lru_cache(maxsize=1)
def detect() -> Sandbox:
    """The sandbox this machine offers, probed once: the tool must exist and actually start (a
    container without user namespaces has bwrap but cannot use it)."""
    if os.environ.get("K2MLX_SANDBOX", "").lower() in ("0", "off", "none"):
        return Sandbox("none", reason="K2MLX_SANDBOX=off")
    if sys.platform == "darwin":
        exe = shutil.which("sandbox-exec") or ("/usr/bin/sandbox-exec" if os.path.exists("/usr/bin/sandbox-exec")
                                               else None)
        kind = "seatbelt"
    elif sys.platform.startswith("linux"):
        exe, kind = shutil.which("bwrap"), "bubblewrap"
    else:
        return Sandbox("none", reason=f"no sandbox support on {sys.platform}")
    if exe is None:
        return Sandbox("none", reason=f"{'sandbox-exec' if kind == 'seatbelt' else 'bwrap'} not found")
    box = Sandbox(kind, exe)
    tmp = tempfile.mkdtemp(prefix="k2mlx-sandbox-probe-")
    try:
        real = os.path.realpath(tmp)
        probe = subprocess.run(box.argv("touch probe", workspace=real, cwd=real, private_tmp=real, network=False),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
        ok = probe.returncode == 0 and os.path.exists(os.path.join(real, "probe"))
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, probe = False, e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        err = getattr(probe, "stderr", b"") or b""
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [str(probe)]
        log.warning("run_shell sandbox %s does not start here: %s", exe, why[0])
        return Sandbox("none", reason=f"{os.path.basename(exe)} cannot start here: {why[0][:120]}")
    return box


class Capture:
    """Output kept while it is read: the first `head` bytes and the last `tail` bytes; the rest is
    counted and dropped, so a command that floods output costs bounded memory."""

    def __init__(self, head: int, tail: int):
        self.head_n, self.tail_n = head, tail
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_n - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_n:
                del self.tail[:len(self.tail) - self.tail_n]

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        head = self.head.decode("utf-8", errors="replace")
        if not self.tail:
            return head
        tail = bytes(self.tail)
        if dropped:
            i = 0
            while i < min(len(tail), 3) and 0x80 <= tail[i] < 0xC0:
                i += 1  # a character cut in half at the drop
            tail = tail[i:]
            return f"{head}\n... [{dropped} bytes cut] ...\n{tail.decode('utf-8', errors='replace')}"
        return (bytes(self.head) + tail).decode("utf-8", errors="replace")


@dataclass
class RunOutcome:
    returncode: int | None  # None: killed at the timeout
    output: str
    timed_out: bool


def _kill_token_holders(token: str) -> None:
    """Linux without a pid namespace: processes that left the process group (setsid) still carry
    the command's private token in their environment; find and kill them through /proc."""
    needle = f"{TOKEN_VAR}={token}".encode()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return  # no /proc (macOS): the process group kill is all there is
    me = os.getpid()
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue  # gone, or not ours to read


async def run_command(command: str, *, box: Sandbox, workspace: str, cwd: str, timeout: float, network: bool,
                      head: int, tail: int) -> RunOutcome:
    """Run `command` (in `box`), reading its output as it comes; end it at `timeout` seconds."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env[TOKEN_VAR] = token
    private_tmp = os.path.realpath(tempfile.mkdtemp(prefix="k2mlx-run-"))
    if box.kind == "seatbelt":
        env["TMPDIR"] = private_tmp
    cap = Capture(head, tail)
    proc = await asyncio.create_subprocess_exec(
        *box.argv(command, workspace=workspace, cwd=cwd, private_tmp=private_tmp, network=network),
        cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)

    async def read() -> None:
        while chunk := await proc.stdout.read(1 << 16):
            cap.feed(chunk)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: pipelines and their children
        if box.kind != "bubblewrap":
            _kill_token_holders(token)  # bwrap's pid namespace already took every descendant

    reader = asyncio.ensure_future(read())
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            timed_out = True
            kill()
            await proc.wait()
        # output still in the pipe; a leftover background child holding it open gets a moment, then dies
        try:
            await asyncio.wait_for(asyncio.shield(reader), 0.5)
        except asyncio.TimeoutError:
            kill()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 1.0)
    except asyncio.CancelledError:
        kill()
        raise
    finally:
        if not reader.done():
            reader.cancel()
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()  # close the pipe even if a process we could not reach still holds it
        shutil.rmtree(private_tmp, ignore_errors=True)
    return RunOutcome(None if timed_out else proc.returncode, cap.text(), timed_out)
