"""SQLite session store: round trip, listing, Markdown export, and no committed message lost
when the writing process is killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

from k2mlx.tui.messages import ChatMessage, ToolCall
from k2mlx.tui.sessions import SessionStore


def conversation():
    return [
        ChatMessage("user", "list the files please"),
        ChatMessage("assistant", "", reasoning="I should call list_dir.",
                    tool_calls=[ToolCall("functions.list_dir:0", "list_dir", '{"path": "."}')],
                    finish_reason="tool_calls"),
        ChatMessage("tool", "file 12 notes.txt", tool_call_id="functions.list_dir:0", name="list_dir",
                    finish_reason="ok"),
        ChatMessage("assistant", "There is one file, `notes.txt`.\n\n```python\nprint('hi')\n```", finish_reason="stop"),
    ]


def test_round_trip_and_export(tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    sid = store.create(model="k2-nano", workspace="/w", system="be brief")
    for m in conversation():
        store.add_message(sid, m)
    empty = store.create(model="k2-nano")  # never used: not listed
    store.close()

    store = SessionStore(db)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.messages(sid) == conversation()
    listed = store.list()
    assert [s.id for s in listed] == [sid] and empty not in [s.id for s in listed]
    info = listed[0]
    assert info.title == "list the files please" and info.n_messages == 4 and info.system == "be brief"
    assert store.latest().id == sid
    md = store.export_markdown(sid)
    assert md.startswith("# list the files please\n")
    for piece in ["## System\n\nbe brief", "## User\n\nlist the files please", "**Tool call** `list_dir`",
                  '{"path": "."}', "**Tool result** `list_dir`", "file 12 notes.txt",
                  "<details><summary>Reasoning</summary>", "There is one file, `notes.txt`.", "```python\nprint('hi')"]:
        assert piece in md, piece
    assert not store.delete_last(sid, "user")  # the last message is the assistant's: kept
    extra = store.add_message(sid, ChatMessage("user", "refused prompt"))
    assert extra == 4 and store.delete_last(sid, "user") and store.messages(sid) == conversation()
    store.update_session(sid, system="new", title="renamed")
    assert store.get(sid).system == "new" and store.get(sid).title == "renamed"


WRITER = textwrap.dedent("""
    import sys
    from k2mlx.tui.messages import ChatMessage
    from k2mlx.tui.sessions import SessionStore
    store = SessionStore(sys.argv[1])
    sid = store.create(model="m")
    i = 0
    while True:
        store.add_message(sid, ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 500))
        print(sid, i, flush=True)
        i += 1
""")


def test_kill_9_loses_no_committed_message(tmp_path):
    db = tmp_path / "s.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    seen = -1
    try:
        for line in proc.stdout:
            sid, i = line.split()
            seen = int(i)
            if seen >= 300:
                break
        os.kill(proc.pid, signal.SIGKILL)  # mid-write: the next transaction is in flight
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    msgs = SessionStore(db).messages(sid)
    assert len(msgs) >= seen + 1  # every message reported as committed is there
    for i, m in enumerate(msgs):
        assert m.content == f"message {i} " + "x" * 500


def test_cluster_panel_renders_a_health_snapshot():
    """The panel takes the shape `k2mlx.distributed`'s health hub reports (per rank: host,
    layers, memory, health) and names a failed rank."""
    from rich.console import Console

    from k2mlx.tui.widgets.status import cluster_renderable

    snapshot = {"ranks": [
        {"rank": 0, "host": "mac-studio-a", "layers": [0, 31], "health": "ok",
         "memory": {"peak_rss": 3 << 30, "mlx_active": 301 << 30}},
        {"rank": 1, "host": "mac-studio-b", "layers": [31, 61], "health": "late", "memory": {"mlx_active": 290 << 30}},
    ], "error": "[rank 1, host mac-studio-b] no heartbeat for 6.0 s"}

    def text(info):
        console = Console(width=80, record=True, file=open(os.devnull, "w"))
        console.print(cluster_renderable(info))
        return console.export_text()

    shown = text(snapshot)
    for piece in ["2 ranks", "mac-studio-a", "0–30", "31–60", "301.0 GB", "290.0 GB", "late", "no heartbeat"]:
        assert piece in shown, (piece, shown)
    rows = [line.split() for line in shown.splitlines() if "mac-studio" in line and "heartbeat" not in line]
    assert [r[0] for r in rows] == ["0", "1"] and [r[-1] for r in rows] == ["ok", "late"]
    assert "not attached to a cluster" in text(None)


def test_database_is_private(tmp_path, monkeypatch):
    """Sessions hold file contents and command output: 0600 database (and WAL files), 0700 folder."""
    import stat

    monkeypatch.delenv("K2MLX_SESSIONS_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    old = os.umask(0o022)  # a usual umask would make both world-readable
    try:
        store = SessionStore()
        sid = store.create(model="k2-nano")
        store.add_message(sid, ChatMessage("user", "my secret"))
        folder = tmp_path / "data" / "k2mlx"
        mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
        assert store.path == folder / "sessions.db"
        assert mode(folder) == 0o700
        files = [p for p in folder.iterdir() if p.name.startswith("sessions.db")]
        assert {p.name for p in files} >= {"sessions.db", "sessions.db-wal", "sessions.db-shm"}
        assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
        store.close()
        # made looser by an older version: the next open tightens them
        os.chmod(folder, 0o755)
        os.chmod(folder / "sessions.db", 0o644)  # (closing removed the -wal and -shm files)
        SessionStore().close()
        assert mode(folder) == 0o700 and mode(folder / "sessions.db") == 0o600
        custom = tmp_path / "mine" / "s.db"  # --sessions-db: the file is private too
        SessionStore(custom).close()
        assert mode(custom) == 0o600 and mode(custom.parent) == 0o700
    finally:
        os.umask(old)
