"""Race-free file access below the workspace root: descriptors, never path strings.

Every path is walked one component at a time from a descriptor of the workspace root with
`O_NOFOLLOW`, so the kernel never follows a symlink for us. A symlink met on the way is read
(`readlink` relative to the folder descriptor that holds it) and its target is walked the same
way; `..` pops the walked components and may not leave the root. A file or folder swapped for
a symlink between any check and the open therefore cannot lead outside: the open itself refuses
the link, and the walk then judges the link's target like any other path.

Writes create their temporary file exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`, random name) in the
target folder's descriptor and rename it into place relative to that same descriptor."""
from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager

MAX_LINK_HOPS = 40  # as the kernel's own ELOOP limit: a link cycle ends in a clear refusal
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a planted FIFO must not hang the tool (it is refused as not a regular file)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


class Escape(Exception):
    """The path leads outside the root. `why` says how (for the refusal message)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class NotFound(Exception):
    """No such file or folder, or (`present`) something of another kind is there."""

    def __init__(self, rel: str, kind: str = "file", present: bool = False):
        super().__init__(f"{rel} is not a {kind}" if present else f"no such {kind}: {rel}")
        self.rel, self.present = rel, present


def _is_link(name: str, dir_fd: int) -> str | None:
    """The link's target if `name` in `dir_fd` is a symlink (read race-free via the folder's fd)."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
            return None
        raise


class Walk:
    """One path walked below `root_fd`. `parts` are the real component names relative to the root.

    final: "file" opens a regular file (`self.fd`), "dir" a folder, "any" either (`self.is_dir`),
    "parent" stops before the last
    component (`self.dir_fd`, `self.name`) after resolving a symlink there if it points inside, so a
    write replaces the link's target, like the realpath-based tools did. `create` makes missing
    folders on the way (mkdir relative to the parent's descriptor)."""

    def __init__(self, root_fd: int, root: str, path: str, final: str, create: bool = False):
        self.root_fd, self.root = root_fd, root
        self.fds: list[int] = []
        self.parts: list[str] = []
        self.followed_link = False
        self.fd: int | None = None
        self.name: str | None = None
        self.is_dir = False
        self._hops = 0
        try:
            self._walk(self._relative(path), final, create)
        except BaseException:
            self.close()
            raise

    @property
    def dir_fd(self) -> int:
        return self.fds[-1] if self.fds else self.root_fd

    @property
    def rel(self) -> str:
        parts = self.parts + ([self.name] if self.name else [])
        return "/".join(parts) or "."

    def _relative(self, path: str) -> list[str]:
        if not os.path.isabs(path):
            return path.split("/")
        prefix = self.root.rstrip(os.sep) + os.sep
        if path == self.root or path.startswith(prefix):
            return path[len(prefix):].split("/")  # not normalized: the walk judges each `..` itself
        # through links above the root (macOS /var -> /private/var): realpath only translates the
        # folder's name; the walk below still opens every component itself
        real_dir = os.path.realpath(os.path.dirname(path))
        if real_dir == self.root or real_dir.startswith(prefix):
            return real_dir[len(prefix):].split(os.sep) + [os.path.basename(path)]
        raise Escape("absolute path outside the workspace")

    def _push_link(self, target: str, rest: list[str]) -> list[str]:
        self.followed_link = True
        self._hops += 1
        if self._hops > MAX_LINK_HOPS:
            raise Escape("too many levels of symlinks")
        if os.path.isabs(target):
            try:
                parts = self._relative(target)
            except Escape:
                raise Escape("a symlink in it points outside the workspace") from None
            self._pop_all()
            return parts + rest
        return target.split("/") + rest

    def _missing(self, name: str, todo: list[str]) -> str:
        """The whole path that does not exist (a new file's name in a new folder, for its diff)."""
        return "/".join(self.parts + [name] + [p for p in todo if p not in ("", ".")])

    def _pop_all(self) -> None:
        while self.fds:
            os.close(self.fds.pop())
        self.parts.clear()

    def _walk(self, todo: list[str], final: str, create: bool) -> None:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if not self.parts:
                    raise Escape("a symlink in it points outside the workspace" if self.followed_link
                                 else "'..' leads outside the workspace")
                os.close(self.fds.pop())
                self.parts.pop()
                continue
            last = not any(p not in ("", ".") for p in todo)
            if last and final == "parent":
                target = _is_link(name, self.dir_fd)
                if target is not None:
                    todo = self._push_link(target, todo)
                    continue
                self.name = name
                return
            if last:  # "file", "dir" or "any": one O_NOFOLLOW open, then the descriptor says what it is
                try:
                    fd = os.open(name, _FILE_FLAGS, dir_fd=self.dir_fd)
                except OSError as e:
                    target = _is_link(name, self.dir_fd) if e.errno in (errno.ELOOP, errno.EMLINK) else None
                    if target is not None:
                        todo = self._push_link(target, todo)
                        continue
                    if e.errno == errno.ENOENT:
                        raise NotFound("/".join(self.parts + [name]), "file or folder") from None
                    raise
                self.name, self.fd = name, fd
                self._check_kind(final)
                return
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=self.dir_fd)
            except OSError as e:
                target = _is_link(name, self.dir_fd) if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) else None
                if target is not None:
                    todo = self._push_link(target, todo)
                    continue
                if e.errno == errno.ENOENT and create:
                    self._hops += 1  # a racer deleting each new folder cannot keep the walk spinning
                    if self._hops > MAX_LINK_HOPS:
                        raise
                    try:
                        os.mkdir(name, 0o777, dir_fd=self.dir_fd)
                    except FileExistsError:
                        pass  # made by someone else meanwhile: the retry below judges what it is
                    todo.insert(0, name)
                    continue
                if e.errno == errno.ENOENT:
                    raise NotFound(self._missing(name, todo), "file or folder") from None
                if e.errno == errno.ENOTDIR:
                    raise NotFound("/".join(self.parts + [name]), "folder", present=True) from None
                raise
            self.fds.append(fd)
            self.parts.append(name)
        if final == "parent":
            raise NotFound(self.rel, "file name")
        self.fd = os.dup(self.dir_fd)  # the path named a folder already walked ("." or "a/..")
        self._check_kind(final)

    def _check_kind(self, final: str) -> None:
        mode = os.fstat(self.fd).st_mode
        self.is_dir = stat.S_ISDIR(mode)
        if final == "file" and not stat.S_ISREG(mode):
            raise NotFound(self.rel, "regular file (it is a folder)" if self.is_dir else "regular file", present=True)
        if final == "dir" and not self.is_dir:
            raise NotFound(self.rel, "folder", present=True)
        if final == "any" and not (self.is_dir or stat.S_ISREG(mode)):
            raise NotFound(self.rel, "regular file or folder", present=True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class SafeRoot:
    """The workspace root as a descriptor (opened once, so renaming the folder changes nothing)."""

    def __init__(self, root: str):
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)

    @contextmanager
    def walk(self, path: str, final: str, create: bool = False):
        w = Walk(self.fd, self.root, path, final, create)
        try:
            yield w
        finally:
            w.close()

    def write_atomic(self, path: str, data: bytes, *, create_dirs: bool = True) -> tuple[str, bool]:
        """Write `data` to `path` through an exclusive temp file renamed into place; returns the
        relative path written and whether a file was there before."""
        with self.walk(path, "parent", create=create_dirs) as w:
            d, name = w.dir_fd, w.name
            try:
                st = os.stat(name, dir_fd=d, follow_symlinks=False)
                existed, mode = True, stat.S_IMODE(st.st_mode)
                if not stat.S_ISREG(st.st_mode):
                    kind = "regular file (it is a folder)" if stat.S_ISDIR(st.st_mode) else "regular file"
                    raise NotFound(w.rel, kind, present=True)
            except FileNotFoundError:
                existed, mode = False, None  # a new file: the kernel applies the umask to 0o666
            fd, tmp = _create_exclusive(d, name, 0o600 if existed else 0o666)
            try:
                with os.fdopen(fd, "wb", closefd=True) as fh:
                    fh.write(data)
                    fh.flush()
                    if mode is not None:
                        os.fchmod(fh.fileno(), mode)  # an overwrite keeps the file's permissions
                os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=d)
                except OSError:
                    pass  # already renamed, or the folder went away: nothing left to clean
                raise
            return w.rel, existed


def _create_exclusive(d: int, name: str, mode: int) -> tuple[int, str]:
    """A new temp file next to `name`: O_EXCL|O_NOFOLLOW with a random suffix, so a planted file
    or symlink at any predictable name is never written through (mkstemp's rule)."""
    for _ in range(100):
        tmp = f".{name[:100]}.{secrets.token_hex(6)}.k2mlx-tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=d), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file")
