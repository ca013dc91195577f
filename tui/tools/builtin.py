"""The built-in agent tools. Each is a `Tool`: an OpenAI function declaration plus an async
`run(args) -> ToolResult`. File tools open paths through `Workspace.open`/`Workspace.write`
(safefs: descriptors, no symlink following); run_shell runs in the OS sandbox (sandbox.py).
Tools that write or run have `needs_approval=True` and the app asks the user before calling them."""
from __future__ import annotations

import asyncio
import codecs
import difflib
import fnmatch
import logging
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional

from k2mlx.tui.messages import ToolResult
from k2mlx.tui.tools.confine import ToolRefused, Workspace
from k2mlx.tui.tools.safefs import NotFound
from k2mlx.tui.tools.sandbox import Sandbox, detect, run_command

log = logging.getLogger(__name__)

MAX_READ_CHARS = 60_000
MAX_SHELL_OUTPUT = 16_000  # bytes kept of a command's output (head and tail)
MAX_SHELL_TIMEOUT = 600.0
MAX_LIST = 500
MAX_GREP_HITS = 200
MAX_GREP_BYTES = 2_000_000  # per file
MAX_EDIT_BYTES = 8_000_000  # write_file's diff and edit_file read the whole file
READ_CHUNK = 1 << 16
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", ".mypy_cache", ".pytest_cache"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    run: Callable[[dict], Awaitable[ToolResult]]
    needs_approval: bool = False
    source: str = "built-in"  # or the MCP server's name
    preview: Optional[Callable[[dict], str]] = field(default=None, repr=False)  # diff shown before approval
    confinement: str = ""  # run_shell: what its sandbox confines (shown on the approval card)
    always_asks: bool = False  # unsandboxed run_shell: asks every time, even after "always" or --yes
    network_option: bool = False  # the card offers "allow once with network" (run(args, network=True))

    def spec(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _obj(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required}


def _str(desc: str) -> dict:
    return {"type": "string", "description": desc}


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 3 // 4], text[-limit // 4:]
    return f"{head}\n... [{len(text) - len(head) - len(tail)} characters cut] ...\n{tail}"


def unified_diff(old: str, new: str, name: str) -> str:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=f"a/{name}", tofile=f"b/{name}")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _glob_regex(pattern: str) -> re.Pattern:
    """pathlib-style glob over '/'-separated relative paths: `**` spans folders, `*` and `?` do not."""
    out, segs = [], pattern.split("/")
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        piece, j = "", 0
        while j < len(seg):
            ch = seg[j]
            if ch == "*":
                piece += "[^/]*"
            elif ch == "?":
                piece += "[^/]"
            elif ch == "[" and seg.find("]", j + 2) > 0:
                end = seg.find("]", j + 2)  # "[]...]" and "[!]...]" keep a leading "]" in the class
                body = seg[j + 1:end]
                neg, body = body.startswith("!"), body[1:] if body.startswith("!") else body
                body = body.replace("\\", "\\\\").replace("[", "\\[").replace("^", "\\^")  # ranges (a-z) stay
                piece += "[" + ("^" if neg else "") + body + "]"
                j = end
            else:
                piece += re.escape(ch)
            j += 1
        out.append(piece + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z", re.S)


def _fwalk(fd: int):
    """(relative dirpath, filenames, dir_fd) below a folder descriptor, never through a symlink:
    os.fwalk opens each folder relative to its parent's descriptor and checks it is the folder
    it listed (a folder swapped for a link is skipped)."""
    for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel = os.path.normpath(dirpath)
        yield ("" if rel == "." else rel), dirnames, sorted(filenames), dirfd


def _open_in(dirfd: int, name: str) -> int | None:
    """A regular file in a walked folder, opened without following a link (None: skip it)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=dirfd)
    except OSError:
        return None  # a link (ELOOP), gone meanwhile, unreadable: not searched
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _read_at_most(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        b = os.read(fd, min(left, READ_CHUNK))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def _decode_cut(data: bytes, *, at_start: bool) -> str:
    """Decode bytes cut out of a file: drop the partial UTF-8 character at the cut edge."""
    if at_start:
        i = 0
        while i < min(len(data), 3) and 0x80 <= data[i] < 0xC0:
            i += 1  # continuation bytes of a character that began before the cut
        data = data[i:]
        return data.decode("utf-8", errors="replace")
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def read_bounded(fd: int, size: int, offset: int, limit: int | None, cap: int) -> str:
    """The text read_file returns, reading only about as much of the file as it returns: the whole
    file if it fits in `cap` characters, else its head and tail; with offset/limit, a stream over
    lines that keeps only the lines asked for (at most `cap` characters of them)."""
    budget = cap * 4  # UTF-8: a character is at most 4 bytes
    if not offset and not limit:
        if size <= budget:
            return _cap(_read_at_most(fd, budget + 1).decode("utf-8", errors="replace"), cap)
        head_n, tail_n = cap * 3 // 4, cap // 4
        head = _decode_cut(_read_at_most(fd, head_n), at_start=False)[:head_n]
        os.lseek(fd, max(0, size - tail_n), os.SEEK_SET)
        tail = _decode_cut(_read_at_most(fd, tail_n), at_start=True)[-tail_n:]
        return f"{head}\n... [{size - head_n - tail_n} bytes cut: read a range with offset/limit] ...\n{tail}"
    out, skipped, taken, cut = bytearray(), 0, 0, False
    while not cut and (limit is None or taken < limit):
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            break
        i = 0
        while skipped < offset:  # skipping keeps nothing, however long the lines
            j = chunk.find(b"\n", i)
            if j < 0:
                i = len(chunk)
                break
            skipped, i = skipped + 1, j + 1
        while i < len(chunk) and (limit is None or taken < limit):
            j = chunk.find(b"\n", i)
            end = len(chunk) if j < 0 else j + 1
            out += chunk[i:end]
            taken += j >= 0
            i = end
            if len(out) > budget:
                cut = True
                break
    text = _decode_cut(bytes(out), at_start=False) if cut else bytes(out).decode("utf-8", errors="replace")
    if cut or len(text) > cap:
        return text[:cap] + f"\n... [cut at {cap} characters: ask for fewer lines] ..."
    return text


def _threaded(fn):
    """File work runs in a thread so a big grep or read never freezes the UI."""
    async def run(args):
        return await asyncio.to_thread(fn, args)

    return run


def builtin_tools(ws: Workspace, *, shell_timeout: float = 30.0, sandbox: Sandbox | None = None) -> list[Tool]:
    """`sandbox`: run_shell's OS sandbox (default: what `sandbox.detect()` finds on this machine)."""
    box = detect() if sandbox is None else sandbox
    def need(args: dict, key: str) -> str:
        value = args.get(key)
        if not isinstance(value, str):
            raise ToolRefused(f"missing string argument '{key}'")
        return value

    def count(args: dict, key: str) -> int:
        value = args.get(key)
        if value is None:
            return 0
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < 0):
            raise ToolRefused(f"'{key}' must be a whole number >= 0, got {value!r}")
        return int(value)

    def read_file(args):
        offset, limit = count(args, "offset"), count(args, "limit")
        try:
            with ws.open(need(args, "path"), "file") as w:
                return ToolResult("ok", read_bounded(w.fd, os.fstat(w.fd).st_size, offset, limit or None,
                                                     MAX_READ_CHARS))
        except NotFound as e:
            return ToolResult("error", str(e))

    def list_dir(args):
        try:
            with ws.open(args.get("path") or ".", "dir") as w:
                entries = sorted(os.scandir(w.fd), key=lambda e: e.name)
        except NotFound as e:
            return ToolResult("error", str(e))
        rows = []
        for entry in entries[:MAX_LIST]:
            kind = "link" if entry.is_symlink() else "dir" if entry.is_dir(follow_symlinks=False) else "file"
            try:
                size = entry.stat(follow_symlinks=False).st_size if kind == "file" else ""
            except OSError:
                size = "?"  # removed while listing
            rows.append(f"{kind:4} {size!s:>9} {entry.name}{'/' if kind == 'dir' else ''}")
        return ToolResult("ok", "\n".join(rows) or "(empty)")

    def glob_(args):
        pattern = need(args, "pattern")
        if os.path.isabs(pattern) or ".." in pattern.split("/"):
            raise ToolRefused(f"refused: glob pattern '{pattern}' reaches outside the workspace {ws.root}")
        rx = _glob_regex(pattern.strip("/") or ".")
        hits = []
        with ws.open(".", "dir") as w:
            for rel, dirnames, filenames, dirfd in _fwalk(w.fd):
                for name in sorted(dirnames + filenames):
                    path = f"{rel}/{name}" if rel else name
                    if not rx.match(path):
                        continue
                    if os.path.islink(ws.root / path) and not ws.contains(Path(os.path.realpath(ws.root / path))):
                        continue  # only a name, but a link out is not the workspace's
                    hits.append(path)
                if len(hits) >= MAX_LIST:
                    break
        return ToolResult("ok", "\n".join(sorted(hits)[:MAX_LIST]) or "(no matches)")

    def grep(args):
        try:
            rx = re.compile(need(args, "pattern"))
        except re.error as e:
            return ToolResult("error", f"bad regular expression: {e}")
        include = args.get("include")
        if include is not None and not isinstance(include, str):
            raise ToolRefused(f"'include' must be a glob string such as '*.py', got {include!r}")
        hits = []

        def search(fd: int, shown: str) -> bool:
            data = _read_at_most(fd, MAX_GREP_BYTES)
            if b"\0" in data[:4096]:
                return False  # binary
            for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if rx.search(line):
                    hits.append(f"{shown}:{n}: {line[:300]}")
                    if len(hits) >= MAX_GREP_HITS:
                        return True
            return False

        try:
            with ws.open(args.get("path") or ".", "any") as w:
                if not w.is_dir:
                    search(w.fd, w.rel)
                else:
                    for rel, _, filenames, dirfd in _fwalk(w.fd):
                        for name in filenames:
                            if include and not fnmatch.fnmatch(name, include):
                                continue
                            fd = _open_in(dirfd, name)
                            if fd is None:
                                continue
                            try:
                                full = "/".join(p for p in (w.rel if w.rel != "." else "", rel, name) if p)
                                if search(fd, full):
                                    return ToolResult("ok", "\n".join(hits) + "\n... (more matches cut)")
                            finally:
                                os.close(fd)
        except NotFound as e:
            return ToolResult("error", str(e))
        return ToolResult("ok", "\n".join(hits) or "(no matches)")

    def read_for_edit(path: str) -> tuple[str, str] | tuple[str, None]:
        """(relative path, text) of an existing file, or (relative path, None) if there is none."""
        try:
            with ws.open(path, "file") as w:
                size = os.fstat(w.fd).st_size
                if size > MAX_EDIT_BYTES:
                    raise ToolRefused(f"{w.rel} is {size} bytes; write_file/edit_file handle files up to "
                                      f"{MAX_EDIT_BYTES} bytes")
                return w.rel, _read_at_most(w.fd, MAX_EDIT_BYTES).decode("utf-8", errors="replace")
        except NotFound as e:
            if e.present:  # a folder, FIFO or device is there: never replaced by a file
                raise ToolRefused(str(e)) from None
            return e.rel, None

    def write_preview(args):
        rel, old = read_for_edit(need(args, "path"))
        return unified_diff(old or "", need(args, "content"), rel)

    def write_file(args):
        path, content = need(args, "path"), need(args, "content")
        rel, old = read_for_edit(path)
        diff = unified_diff(old or "", content, rel)
        rel, existed = ws.write(path, content.encode("utf-8"))
        verb = "overwrote" if existed else "created"
        return ToolResult("ok", f"{verb} {rel} ({len(content)} characters)", diff=diff)

    def _edited(args):
        path = need(args, "path")
        rel, text = read_for_edit(path)
        if text is None:
            raise ToolRefused(f"no such file: {rel}")
        old_s, new_s = need(args, "old_string"), need(args, "new_string")
        count = text.count(old_s) if old_s else 0
        if count == 0:
            raise ToolRefused(f"old_string not found in {rel} (it must match exactly, whitespace included)")
        if count > 1 and not args.get("replace_all"):
            raise ToolRefused(f"old_string occurs {count} times in {rel}; add context to make it unique "
                              "or set replace_all")
        new = text.replace(old_s, new_s) if args.get("replace_all") else text.replace(old_s, new_s, 1)
        return rel, text, new, count

    def edit_preview(args):
        rel, old, new, _ = _edited(args)
        return unified_diff(old, new, rel)

    def edit_file(args):
        rel, old, new, count = _edited(args)
        ws.write(need(args, "path"), new.encode("utf-8"))
        n = count if args.get("replace_all") else 1
        return ToolResult("ok", f"edited {rel}: {n} replacement(s)", diff=unified_diff(old, new, rel))

    def shell_check(args):
        """Checks before anyone is asked (no preview text): arguments, timeout, working folder."""
        command = need(args, "command")
        timeout = args.get("timeout")
        if timeout is None:
            timeout = shell_timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_SHELL_TIMEOUT:
            raise ToolRefused(f"timeout must be a number of seconds above 0 and at most {MAX_SHELL_TIMEOUT:g}, "
                              f"got {timeout!r}")
        cwd = ws.resolve(args.get("cwd") or ".", what="cwd")
        ws.check_command(command, cwd)  # early, readable refusals; the sandbox is the boundary
        return command, cwd, float(timeout)

    async def run_shell(args, *, network: bool = False):
        command, cwd, timeout = shell_check(args)
        out = await run_command(command, box=box, workspace=str(ws.root), cwd=str(cwd), timeout=timeout,
                                network=network and box.active, head=MAX_SHELL_OUTPUT * 3 // 4,
                                tail=MAX_SHELL_OUTPUT // 4)
        text = out.output.rstrip("\n")
        if out.timed_out:
            end = f"[timed out after {timeout:g} s: the command and everything it started were killed]"
            return ToolResult("error", f"{text}\n{end}" if text else end)
        status = "ok" if out.returncode == 0 else "error"
        return ToolResult(status, f"{text}\n[exit code {out.returncode}]" if text else f"[exit code {out.returncode}]")

    def calculator(args):
        from k2mlx.calculator import format_number, safe_eval

        try:
            return ToolResult("ok", format_number(safe_eval(need(args, "expression"))))
        except ValueError as e:
            return ToolResult("error", str(e))

    return [
        Tool("read_file", "Read a text file in the workspace. Optional line offset/limit.",
             _obj({"path": _str("file path relative to the workspace"),
                   "offset": {"type": "integer", "description": "first line (0-based)"},
                   "limit": {"type": "integer", "description": "number of lines"}}, ["path"]), _threaded(read_file)),
        Tool("list_dir", "List the entries of a directory in the workspace.",
             _obj({"path": _str("directory relative to the workspace (default '.')")}, []), _threaded(list_dir)),
        Tool("glob", "Find files in the workspace matching a glob pattern such as '**/*.py'.",
             _obj({"pattern": _str("glob pattern relative to the workspace")}, ["pattern"]), _threaded(glob_)),
        Tool("grep", "Search files in the workspace for a regular expression; prints path:line: text.",
             _obj({"pattern": _str("Python regular expression"), "path": _str("file or directory (default '.')"),
                   "include": _str("only files whose name matches this glob, e.g. '*.py'")}, ["pattern"]),
             _threaded(grep)),
        Tool("write_file", "Create or overwrite a file in the workspace with the given content.",
             _obj({"path": _str("file path relative to the workspace"), "content": _str("the full new content")},
                  ["path", "content"]), _threaded(write_file), needs_approval=True, preview=write_preview),
        Tool("edit_file", "Replace an exact string in a file (old_string must occur exactly once unless replace_all).",
             _obj({"path": _str("file path relative to the workspace"), "old_string": _str("exact text to replace"),
                   "new_string": _str("replacement text"),
                   "replace_all": {"type": "boolean", "description": "replace every occurrence"}},
                  ["path", "old_string", "new_string"]), _threaded(edit_file), needs_approval=True, preview=edit_preview),
        Tool("run_shell", "Run a shell command in the workspace (timeout in seconds, output capped).",
             _obj({"command": _str("the command line"), "timeout": {"type": "number", "description": "seconds"},
                   "cwd": _str("directory relative to the workspace")}, ["command"]),
             run_shell, needs_approval=True, preview=lambda a: (shell_check(a), None)[1],
             confinement=box.describe(), always_asks=not box.active, network_option=box.active),
        # models (k2-nano above all) are bad at arithmetic: an exact evaluator, no code execution
        Tool("calculator", "Evaluate an arithmetic expression.",
             _obj({"expression": _str("The expression to evaluate")}, ["expression"]), _threaded(calculator)),
    ]


async def call_tool(tool: Tool, args: dict, *, network: bool = False) -> ToolResult:
    """Run a tool, turning refusals and crashes into results (a tool error never breaks the chat).
    `network`: the user allowed the network for this one call (tools with `network_option`)."""
    t0 = time.perf_counter()
    try:
        result = await (tool.run(args, network=True) if network and tool.network_option else tool.run(args))
    except ToolRefused as e:
        result = ToolResult("refused", str(e))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug or OS error in one tool call is that call's result
        log.exception("tool %s failed", tool.name)
        result = ToolResult("error", f"{type(e).__name__}: {e}")
    result.duration_s = time.perf_counter() - t0
    return result
