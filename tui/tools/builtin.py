"""The built-in agent tools. Each is a `Tool`: an OpenAI function declaration plus an async
`run(args) -> ToolResult`. File tools go through `Workspace.resolve` at call time; tools that
write or run have `needs_approval=True` and the app asks the user before calling them."""
from __future__ import annotations

import asyncio
import difflib
import fnmatch
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from k2mlx.tui.messages import ToolResult
from k2mlx.tui.tools.confine import ToolRefused, Workspace

MAX_READ_CHARS = 60_000
MAX_SHELL_OUTPUT = 16_000
MAX_LIST = 500
MAX_GREP_HITS = 200
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


def _walk(ws: Workspace, base):
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            yield os.path.join(dirpath, f)


def _threaded(fn):
    """File work runs in a thread so a big grep or read never freezes the UI."""
    async def run(args):
        return await asyncio.to_thread(fn, args)

    return run


def builtin_tools(ws: Workspace, *, shell_timeout: float = 30.0) -> list[Tool]:
    def need(args: dict, key: str) -> str:
        value = args.get(key)
        if not isinstance(value, str):
            raise ToolRefused(f"missing string argument '{key}'")
        return value

    def read_file(args):
        p = ws.resolve(need(args, "path"))
        if not p.is_file():
            return ToolResult("error", f"no such file: {ws.rel(p)}")
        text = p.read_bytes().decode("utf-8", errors="replace")
        offset, limit = int(args.get("offset") or 0), args.get("limit")
        if offset or limit:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[offset: offset + int(limit) if limit else None])
        return ToolResult("ok", _cap(text, MAX_READ_CHARS))

    def list_dir(args):
        p = ws.resolve(args.get("path") or ".")
        if not p.is_dir():
            return ToolResult("error", f"not a directory: {ws.rel(p)}")
        rows = []
        for entry in sorted(p.iterdir(), key=lambda e: e.name)[:MAX_LIST]:
            kind = "link" if entry.is_symlink() else "dir" if entry.is_dir() else "file"
            size = entry.lstat().st_size if kind == "file" else ""
            rows.append(f"{kind:4} {size!s:>9} {entry.name}{'/' if kind == 'dir' else ''}")
        return ToolResult("ok", "\n".join(rows) or "(empty)")

    def glob_(args):
        pattern = need(args, "pattern")
        if os.path.isabs(pattern) or ".." in pattern.split("/"):
            raise ToolRefused(f"refused: glob pattern '{pattern}' reaches outside the workspace {ws.root}")
        hits = []
        for m in sorted(ws.root.glob(pattern)):
            real = os.path.realpath(m)
            if ws.contains(type(ws.root)(real)) and not (set(m.relative_to(ws.root).parts) & SKIP_DIRS):
                hits.append(str(m.relative_to(ws.root)))
            if len(hits) >= MAX_LIST:
                break
        return ToolResult("ok", "\n".join(hits) or "(no matches)")

    def grep(args):
        try:
            rx = re.compile(need(args, "pattern"))
        except re.error as e:
            return ToolResult("error", f"bad regular expression: {e}")
        base = ws.resolve(args.get("path") or ".")
        include = args.get("include")
        files = [str(base)] if base.is_file() else _walk(ws, base)
        hits = []
        for f in files:
            if include and not fnmatch.fnmatch(os.path.basename(f), include):
                continue
            real = os.path.realpath(f)
            if not ws.contains(type(ws.root)(real)):
                continue  # a link out of the workspace: never read through it
            try:
                with open(real, "rb") as fh:
                    data = fh.read(2_000_000)
            except OSError:
                continue
            if b"\0" in data[:4096]:
                continue  # binary
            for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if rx.search(line):
                    hits.append(f"{os.path.relpath(f, ws.root)}:{n}: {line[:300]}")
                    if len(hits) >= MAX_GREP_HITS:
                        return ToolResult("ok", "\n".join(hits) + "\n... (more matches cut)")
        return ToolResult("ok", "\n".join(hits) or "(no matches)")

    def write_preview(args):
        p = ws.resolve(need(args, "path"))
        old = p.read_text(errors="replace") if p.is_file() else ""
        return unified_diff(old, need(args, "content"), ws.rel(p))

    def write_file(args):
        p = ws.resolve(need(args, "path"))
        content = need(args, "content")
        diff = write_preview(args)
        existed = p.exists()
        p.parent.mkdir(parents=True, exist_ok=True)
        ws.resolve(str(p.parent))  # mkdir followed no link out (re-checked after creation)
        tmp = p.with_name(f".{p.name}.k2mlx-tmp")
        tmp.write_text(content)
        os.replace(tmp, p)  # atomic: a reader never sees half a file
        verb = "overwrote" if existed else "created"
        return ToolResult("ok", f"{verb} {ws.rel(p)} ({len(content)} characters)", diff=diff)

    def _edited(args):
        p = ws.resolve(need(args, "path"))
        if not p.is_file():
            raise ToolRefused(f"no such file: {ws.rel(p)}")
        old_s, new_s = need(args, "old_string"), need(args, "new_string")
        text = p.read_text()
        count = text.count(old_s) if old_s else 0
        if count == 0:
            raise ToolRefused(f"old_string not found in {ws.rel(p)} (it must match exactly, whitespace included)")
        if count > 1 and not args.get("replace_all"):
            raise ToolRefused(f"old_string occurs {count} times in {ws.rel(p)}; add context to make it unique "
                              "or set replace_all")
        new = text.replace(old_s, new_s) if args.get("replace_all") else text.replace(old_s, new_s, 1)
        return p, text, new, count

    def edit_preview(args):
        p, old, new, _ = _edited(args)
        return unified_diff(old, new, ws.rel(p))

    def edit_file(args):
        p, old, new, count = _edited(args)
        tmp = p.with_name(f".{p.name}.k2mlx-tmp")
        tmp.write_text(new)
        os.replace(tmp, p)
        n = count if args.get("replace_all") else 1
        return ToolResult("ok", f"edited {ws.rel(p)}: {n} replacement(s)", diff=unified_diff(old, new, ws.rel(p)))

    def shell_check(args):
        """Confinement checks before anyone is asked (no preview text)."""
        command = need(args, "command")
        cwd = ws.resolve(args.get("cwd") or ".", what="cwd")
        ws.check_command(command, cwd)
        return command, cwd

    async def run_shell(args):
        command, cwd = shell_check(args)
        timeout = min(float(args.get("timeout") or shell_timeout), 600.0)
        proc = await asyncio.create_subprocess_shell(
            command, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pipelines and children too
            except ProcessLookupError:
                pass
            await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            return ToolResult("error", f"timed out after {timeout:g} s (process killed)")
        text = _cap(out.decode("utf-8", errors="replace"), MAX_SHELL_OUTPUT).rstrip("\n")
        status = "ok" if proc.returncode == 0 else "error"
        return ToolResult(status, f"{text}\n[exit code {proc.returncode}]" if text else f"[exit code {proc.returncode}]")

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
             run_shell, needs_approval=True, preview=lambda a: (shell_check(a), None)[1]),
        # models (k2-nano above all) are bad at arithmetic: an exact evaluator, no code execution
        Tool("calculator", "Evaluate an arithmetic expression.",
             _obj({"expression": _str("The expression to evaluate")}, ["expression"]), _threaded(calculator)),
    ]


async def call_tool(tool: Tool, args: dict) -> ToolResult:
    """Run a tool, turning refusals and crashes into results (a tool error never breaks the chat)."""
    t0 = time.perf_counter()
    try:
        result = await tool.run(args)
    except ToolRefused as e:
        result = ToolResult("refused", str(e))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug or OS error in one tool call is that call's result
        result = ToolResult("error", f"{type(e).__name__}: {e}")
    result.duration_s = time.perf_counter() - t0
    return result
