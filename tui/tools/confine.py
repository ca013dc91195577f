"""Workspace confinement: every path a file tool touches must lie inside the workspace.

The file tools open paths through `Workspace.open` (safefs: a descriptor walk from the root
that never lets the kernel follow a symlink), so a link pointing out is refused like `..` or an
absolute path outside, and a swap between check and use cannot redirect the open. `resolve`
(realpath) remains for names only: run_shell's working folder and argument screening, whose
real boundary is the OS sandbox (sandbox.py)."""
from __future__ import annotations

import os
import shlex
from contextlib import contextmanager
from pathlib import Path

from k2mlx.tui.tools.safefs import Escape, NotFound, SafeRoot


class ToolRefused(Exception):
    """A tool call that would leave the workspace (or is otherwise not allowed). Shown to the
    user and sent back to the model as the tool's result; the tool does not run."""


class Workspace:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(os.fspath(root)))
        if not self.root.is_dir():
            raise ToolRefused(f"workspace {self.root} is not a directory")
        self.safe = SafeRoot(str(self.root))

    @contextmanager
    def open(self, path: str, final: str, *, what: str = "path", create: bool = False):
        """A `safefs.Walk` of `path` (final: "file", "dir", "any", "parent"); ToolRefused if it leads out."""
        if not isinstance(path, str):
            raise ToolRefused(f"{what} must be a string, got {type(path).__name__}")
        if not path.strip():
            raise ToolRefused(f"{what} is empty")
        try:
            with self.safe.walk(os.path.expanduser(path.strip()), final, create) as w:
                yield w
        except Escape as e:
            raise ToolRefused(f"refused: {what} '{path}' is outside the workspace {self.root} ({e.why})") from None

    def write(self, path: str, data: bytes) -> tuple[str, bool]:
        """Atomic, exclusive-temp write (safefs.SafeRoot.write_atomic); ToolRefused if it leads out."""
        if not isinstance(path, str) or not path.strip():
            raise ToolRefused("path is empty")
        try:
            return self.safe.write_atomic(os.path.expanduser(path.strip()), data)
        except NotFound as e:  # a folder in the way, or the path swapped for one meanwhile
            raise ToolRefused(str(e)) from None
        except Escape as e:
            raise ToolRefused(f"refused: path '{path}' is outside the workspace {self.root} ({e.why})") from None

    def resolve(self, path: str, *, what: str = "path", base: Path | None = None) -> Path:
        """The real path for `path` (relative to `base`, default the workspace), or ToolRefused naming why."""
        if not isinstance(path, str) or not path.strip():
            raise ToolRefused(f"{what} is empty")
        raw = os.path.expanduser(path.strip())
        joined = raw if os.path.isabs(raw) else os.path.join(base or self.root, raw)
        real = Path(os.path.realpath(joined))
        if not self.contains(real):
            if os.path.isabs(raw):
                why = "absolute path outside the workspace"
            elif ".." in Path(raw).parts and not self.contains(Path(os.path.normpath(joined))):
                why = "'..' leads outside the workspace"
            else:
                why = "a symlink in it points outside the workspace"
            raise ToolRefused(f"refused: {what} '{path}' is outside the workspace {self.root} ({why})")
        return real

    def contains(self, real: Path) -> bool:
        return real == self.root or self.root in real.parents

    def rel(self, real: Path) -> str:
        return "." if real == self.root else str(real.relative_to(self.root))

    def check_command(self, command: str, cwd: Path | None = None) -> None:
        """Refuse a shell command whose arguments name paths outside the workspace.

        A best-effort guard (a shell can always compute a path at run time); together with the
        approval prompt it stops the common escapes: absolute paths, `..`, links pointing out,
        `cd` elsewhere. Program names (the first word of each simple command) may be absolute."""
        try:
            lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError as e:
            raise ToolRefused(f"refused: cannot parse the command ({e})") from None
        base = cwd or self.root
        first = True
        for tok in tokens:
            if tok and all(ch in ";&|()<>" for ch in tok):
                first = tok not in ("<", ">", ">>", "<<")  # a redirection's target is a path
                continue
            if first:
                first = False
                if tok == "cd":
                    continue
                if "/" in tok and not os.path.isabs(tok):
                    self._check_arg(tok, base)  # ./script or ../x/script run as a program
                continue
            candidates = [tok] + [part for part in tok.split("=")[1:] if part]
            if tok.startswith("-") and len(tok) > 2 and tok[2:3] in ("/", "~", "."):
                candidates.append(tok[2:])  # -o/etc/x style
            for cand in candidates:
                self._check_arg(cand, base)

    def _check_arg(self, cand: str, base: Path) -> None:
        looks_like_path = cand.startswith(("/", "~", "..")) or "/" in cand or cand in ("..", "~")
        # a plain name can still be a link pointing out ("cat secret_link")
        if (not looks_like_path and not os.path.lexists(os.path.join(base, cand))) or "://" in cand:
            return
        try:
            self.resolve(cand, what="command argument", base=base)
        except ToolRefused as e:
            raise ToolRefused(f"{e}; run_shell only works inside the workspace").with_traceback(None) from None
