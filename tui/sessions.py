"""Chat sessions saved as they happen, in SQLite.

WAL journal and one transaction per message: after a crash (kill -9 mid-reply) every message
committed before it is intact and the file opens cleanly. The store is used from the app's
event-loop thread only; each write is a few milliseconds.

Conversations hold file contents and command output: the database (and its -wal/-shm files)
is 0600 and the default folder 0700, tightened on every open if they were created looser."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from k2mlx.tui.messages import ChatMessage, ToolCall

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    workspace TEXT NOT NULL DEFAULT '',
    system TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    reasoning TEXT NOT NULL DEFAULT '',
    tool_calls TEXT NOT NULL DEFAULT '[]',
    tool_call_id TEXT,
    name TEXT,
    finish_reason TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"""


def default_db_path() -> Path:
    if os.environ.get("K2MLX_SESSIONS_DB"):
        return Path(os.environ["K2MLX_SESSIONS_DB"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "k2mlx" / "sessions.db"


@dataclass
class SessionInfo:
    id: str
    title: str
    model: str
    workspace: str
    system: str
    created: float
    updated: float
    n_messages: int = 0


def _private_folder(folder: Path, *, tighten: bool) -> None:
    """Create `folder` 0700; `tighten`: also make an existing one 0700 (the default k2mlx folder,
    never a folder the user named with --sessions-db)."""
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        tighten = True
    if tighten and folder.stat().st_uid == os.getuid():
        os.chmod(folder, 0o700)


def _private_file(path: Path) -> None:
    """The database file exists as 0600 before SQLite opens it (SQLite gives its -wal and -shm
    files the database's permissions)."""
    # a symlinked database (the user's own choice) is followed; only a file we own is chmod-ed
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SessionStore:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_db_path()
        _private_folder(self.path.parent, tighten=path is None and not os.environ.get("K2MLX_SESSIONS_DB"))
        _private_file(self.path)
        # autocommit mode: every write below opens and commits its own transaction explicitly
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: committed survives a process kill
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        for side in ("-wal", "-shm"):  # made looser by an older k2mlx: tighten
            extra = self.path.with_name(self.path.name + side)
            if extra.exists() and extra.stat().st_uid == os.getuid():
                os.chmod(extra, 0o600)

    def close(self) -> None:
        self.db.close()

    def create(self, *, model: str = "", workspace: str = "", system: str = "", title: str = "",
               session_id: str | None = None, now: float | None = None) -> str:
        """A new session; `session_id`/`now` are for imports (and reproducible tests)."""
        sid = session_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = time.time() if now is None else now
        with self._tx():
            self.db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?)",
                            (sid, title, model, workspace, system, now, now))
        return sid

    def add_message(self, session_id: str, msg: ChatMessage, now: float | None = None) -> int:
        """Append one message in its own transaction; returns its sequence number."""
        now = time.time() if now is None else now
        calls = json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in msg.tool_calls])
        with self._tx():
            (seq,) = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE session_id=?",
                                     (session_id,)).fetchone()
            self.db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (session_id, seq, msg.role, msg.content, msg.reasoning, calls, msg.tool_call_id,
                             msg.name, msg.finish_reason, now))
            if msg.role == "user":  # the first user line names the session
                self.db.execute("UPDATE sessions SET title=? WHERE id=? AND title=''",
                                (" ".join(msg.content.split())[:80], session_id))
            self.db.execute("UPDATE sessions SET updated=? WHERE id=?", (now, session_id))
        return seq

    def delete_last(self, session_id: str, role: str) -> bool:
        """Remove the session's last message if it has `role` (a prompt the server refused)."""
        with self._tx():
            row = self.db.execute("SELECT seq, role FROM messages WHERE session_id=? ORDER BY seq DESC LIMIT 1",
                                  (session_id,)).fetchone()
            if row is None or row[1] != role:
                return False
            self.db.execute("DELETE FROM messages WHERE session_id=? AND seq=?", (session_id, row[0]))
        return True

    def update_session(self, session_id: str, **fields) -> None:
        allowed = {"title", "model", "system", "workspace"}
        sets = {k: v for k, v in fields.items() if k in allowed}
        if not sets:
            return
        with self._tx():
            self.db.execute(f"UPDATE sessions SET {', '.join(f'{k}=?' for k in sets)} WHERE id=?",
                            (*sets.values(), session_id))

    def get(self, session_id: str) -> SessionInfo | None:
        row = self.db.execute(
            "SELECT s.*, (SELECT COUNT(*) FROM messages m WHERE m.session_id=s.id) FROM sessions s WHERE id=?",
            (session_id,)).fetchone()
        return SessionInfo(*row) if row else None

    def list(self, limit: int = 200) -> list[SessionInfo]:
        rows = self.db.execute(
            "SELECT s.*, (SELECT COUNT(*) FROM messages m WHERE m.session_id=s.id) AS n FROM sessions s "
            "WHERE n > 0 ORDER BY updated DESC LIMIT ?", (limit,)).fetchall()
        return [SessionInfo(*r) for r in rows]

    def latest(self) -> SessionInfo | None:
        items = self.list(limit=1)
        return items[0] if items else None

    def messages(self, session_id: str) -> list[ChatMessage]:
        rows = self.db.execute(
            "SELECT role, content, reasoning, tool_calls, tool_call_id, name, finish_reason FROM messages "
            "WHERE session_id=? ORDER BY seq", (session_id,)).fetchall()
        out = []
        for role, content, reasoning, calls, call_id, name, finish in rows:
            tc = [ToolCall(c["id"], c["name"], c["arguments"]) for c in json.loads(calls or "[]")]
            out.append(ChatMessage(role, content, reasoning, tc, call_id, name, finish))
        return out

    def export_markdown(self, session_id: str) -> str:
        info = self.get(session_id)
        if info is None:
            raise KeyError(f"no session {session_id}")
        return to_markdown(info, self.messages(session_id))

    def _tx(self):
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def to_markdown(info: SessionInfo, messages: list[ChatMessage]) -> str:
    lines = [f"# {info.title or 'k2mlx chat'}", "",
             f"- session: `{info.id}`", f"- model: `{info.model}`",
             f"- started: {time.strftime('%Y-%m-%d %H:%M', time.localtime(info.created))}", ""]
    if info.system:
        lines += ["## System", "", info.system, ""]
    for m in messages:
        if m.role == "user":
            lines += ["## User", "", m.content, ""]
        elif m.role == "assistant":
            lines += ["## Assistant", ""]
            if m.reasoning:
                lines += ["<details><summary>Reasoning</summary>", "", m.reasoning, "", "</details>", ""]
            if m.content:
                lines += [m.content, ""]
            for c in m.tool_calls:
                lines += [f"**Tool call** `{c.name}`", "", "```json", c.arguments, "```", ""]
        elif m.role == "tool":
            fence = "````" if "```" in m.content else "```"
            lines += [f"**Tool result** `{m.name or ''}`", "", fence, m.content, fence, ""]
    return "\n".join(lines).rstrip() + "\n"
