"""Attacks on the file tools from a hostile workspace (issue 13, "Agent tools"): a symlink planted
at a temporary name, files and folders swapped for symlinks while the tools run (4,000 swaps,
0 leaks), planted FIFOs, and read_file on a 1 GB (sparse) file reading only what it returns."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from k2mlx.tui.tools import ToolRegistry, Workspace, builtin_tools, call_tool
from k2mlx.tui.tools.sandbox import NONE

SECRET = "TOP SECRET 7f3a"


@pytest.fixture()
def box(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET + "\n")
    (outside / "victim.txt").write_text("victim stays\n")
    reg = ToolRegistry(builtin_tools(Workspace(ws), shell_timeout=5, sandbox=NONE))
    return ws, outside, reg


def run(reg, name, **args):
    return asyncio.run(call_tool(reg.get(name), args))


def test_planted_symlink_at_the_temp_name_writes_nothing_outside(box):
    ws, outside, reg = box
    (ws / "target.txt").write_text("old\n")
    # every name the old code used for its temp file, and a few guesses more
    for name in ("target.txt", "new.txt"):
        os.symlink(outside / "victim.txt", ws / f".{name}.k2mlx-tmp")
        os.symlink(outside / "victim.txt", ws / f"{name}.tmp")
    w = run(reg, "write_file", path="target.txt", content="new content\n")
    assert w.status == "ok" and (ws / "target.txt").read_text() == "new content\n"
    e = run(reg, "edit_file", path="target.txt", old_string="new", new_string="edited")
    assert e.status == "ok" and (ws / "target.txt").read_text() == "edited content\n"
    n = run(reg, "write_file", path="new.txt", content="fresh\n")
    assert n.status == "ok" and (ws / "new.txt").read_text() == "fresh\n"
    assert (outside / "victim.txt").read_text() == "victim stays\n"
    assert sorted(os.listdir(outside)) == ["secret.txt", "victim.txt"]
    assert not (ws / "target.txt").is_symlink()
    leftovers = [p for p in os.listdir(ws) if p.endswith(".k2mlx-tmp") and not os.path.islink(ws / p)]
    assert leftovers == []  # the temp files were renamed into place, none left behind


def test_write_keeps_mode_and_refuses_folders(box):
    ws, _, reg = box
    (ws / "run.sh").write_text("echo 1\n")
    os.chmod(ws / "run.sh", 0o750)
    assert run(reg, "write_file", path="run.sh", content="echo 2\n").status == "ok"
    assert (os.stat(ws / "run.sh").st_mode & 0o777) == 0o750
    (ws / "adir").mkdir()
    r = run(reg, "write_file", path="adir", content="x")
    assert r.status == "refused" and "folder" in r.output and (ws / "adir").is_dir()


def _put(src, dst):
    """rename(src, dst); a folder that write_file made at `dst` in the gap (its mkdir of a missing
    parent) is removed first."""
    while True:
        try:
            os.rename(src, dst)
            return
        except OSError:
            if not os.path.isdir(dst) or os.path.islink(dst):
                raise
            shutil.rmtree(dst, ignore_errors=True)


def _racer(stop: threading.Event, swaps: list, a, a_real, a_link, b, b_real, b_link):
    """Swap folder `a` and file `b` between the real thing and a symlink pointing outside."""
    n = 0
    while not stop.is_set() and n < 4000:
        _put(a, a_real)
        _put(a_link, a)
        _put(b, b_real)
        _put(b_link, b)
        _put(a, a_link)
        _put(a_real, a)
        _put(b, b_link)
        _put(b_real, b)
        n += 1
    swaps.append(n)


def test_swap_race_gives_no_leaks_in_4000_swaps(box):
    ws, outside, reg = box
    (ws / "d").mkdir()
    (ws / "d" / "f.txt").write_text("inside\n")
    (ws / "b.txt").write_text("inside\n")
    (outside / "f.txt").write_text(SECRET + "\n")
    os.symlink(outside, ws / ".d_link")
    os.symlink(outside / "secret.txt", ws / ".b_link")
    stop, swaps = threading.Event(), []
    racer = threading.Thread(target=_racer, args=(stop, swaps, ws / "d", ws / ".d_real", ws / ".d_link",
                                                  ws / "b.txt", ws / ".b_real", ws / ".b_link"))
    calls = [("read_file", {"path": "d/f.txt"}), ("read_file", {"path": "b.txt"}), ("grep", {"pattern": "SECRET"}),
             ("grep", {"pattern": "SECRET", "path": "d"}), ("grep", {"pattern": "SECRET", "path": "b.txt"}),
             ("list_dir", {"path": "d"}), ("glob", {"pattern": "d/*"})]
    leaks, tries = [], 0

    async def attack():
        nonlocal tries
        i = 0
        while racer.is_alive():
            name, args = calls[i % len(calls)]
            r = await call_tool(reg.get(name), args)
            if SECRET in r.output or "secret.txt" in r.output or "victim.txt" in r.output:
                leaks.append((name, args, r.output[:200]))
            w = await call_tool(reg.get("write_file"), {"path": "d/new.txt", "content": "x"})
            tries += 2
            i += 1
            assert w.status in ("ok", "refused", "error"), w

    racer.start()
    try:
        asyncio.run(attack())
    finally:
        stop.set()
        racer.join()
    assert swaps == [4000] and tries > 100
    assert leaks == []
    assert sorted(os.listdir(outside)) == ["f.txt", "secret.txt", "victim.txt"]  # no write landed outside
    assert (outside / "secret.txt").read_text() == SECRET + "\n"


def test_links_inside_the_workspace_still_work(box):
    ws, _, reg = box
    (ws / "real").mkdir()
    (ws / "real" / "a.txt").write_text("through a link\n")
    os.symlink("real", ws / "alias")  # relative, pointing inside
    os.symlink(ws / "real" / "a.txt", ws / "abs_alias.txt")  # absolute, pointing inside
    assert run(reg, "read_file", path="alias/a.txt").output == "through a link\n"
    assert run(reg, "read_file", path="abs_alias.txt").output == "through a link\n"
    assert run(reg, "write_file", path="alias/b.txt", content="b").status == "ok"
    assert (ws / "real" / "b.txt").read_text() == "b"
    os.symlink("loop2", ws / "loop1")
    os.symlink("loop1", ws / "loop2")
    r = run(reg, "read_file", path="loop1")
    assert r.status == "refused" and "too many levels of symlinks" in r.output
    os.symlink("../outside/secret.txt", ws / "rel_out.txt")
    r = run(reg, "read_file", path="rel_out.txt")
    assert r.status == "refused" and "symlink" in r.output and SECRET not in r.output


def test_planted_fifo_does_not_hang_the_tools(box):
    ws, _, reg = box
    os.mkfifo(ws / "pipe")
    r = run(reg, "read_file", path="pipe")
    assert r.status == "error" and "regular file" in r.output
    assert run(reg, "grep", pattern="x").status == "ok"  # the walk skips it
    assert run(reg, "write_file", path="pipe", content="x").status == "refused"


@pytest.mark.parametrize("args,why", [({"offset": -1}, "offset"), ({"limit": "ten"}, "limit"),
                                      ({"offset": True}, "offset"), ({"limit": 2.5}, "limit"),
                                      ({"offset": float("inf")}, "offset"), ({"limit": float("nan")}, "limit")])
def test_read_file_rejects_bad_ranges(box, args, why):
    ws, _, reg = box
    (ws / "a.txt").write_text("a\n")
    r = run(reg, "read_file", path="a.txt", **args)
    assert r.status == "refused" and why in r.output


def test_read_file_ranges_and_cut(box):
    ws, _, reg = box
    (ws / "lines.txt").write_text("".join(f"line {i}\n" for i in range(200_000)))
    assert run(reg, "read_file", path="lines.txt", offset=150_000, limit=2).output == "line 150000\nline 150001\n"
    whole = run(reg, "read_file", path="lines.txt").output
    assert whole.startswith("line 0\n") and whole.endswith("line 199999\n") and "bytes cut" in whole
    assert len(whole) < 61_000
    (ws / "u.txt").write_text("é" * 100_000)  # 2-byte characters cut at both edges: no broken ones
    text = run(reg, "read_file", path="u.txt").output
    assert set(text.replace("\n", "").split("...")[0]) == {"é"} and "\ufffd" not in text


def _peak_rss_mb(code: str) -> float:
    """Run `code` in a fresh interpreter and return its peak RSS in MB (ru_maxrss, Linux KiB)."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport resource\nprint(resource.getrusage("
                          "resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="ru_maxrss units")
def test_read_file_on_a_1gb_file_reads_only_what_it_returns(box):
    ws, _, reg = box
    with open(ws / "big.bin", "wb") as fh:
        fh.truncate(1 << 30)  # sparse: 1 GB of zeros without using the disk
        fh.seek(0)
        fh.write(b"HEAD of a big file\n")
    code = f"""
import asyncio
from k2mlx.tui.tools import Workspace, builtin_tools, call_tool
from k2mlx.tui.tools.sandbox import NONE
tools = {{t.name: t for t in builtin_tools(Workspace({str(ws)!r}), sandbox=NONE)}}
r = asyncio.run(call_tool(tools["read_file"], {{"path": "big.bin"}}))
assert r.status == "ok" and r.output.startswith("HEAD of a big file") and "bytes cut" in r.output, r.output[:100]
assert len(r.output) < 61_000
r = asyncio.run(call_tool(tools["read_file"], {{"path": "big.bin", "offset": 1, "limit": 1}}))
assert r.status == "ok" and len(r.output) < 61_000 and "cut at" in r.output
"""
    baseline = _peak_rss_mb("import k2mlx.tui.tools")
    peak = _peak_rss_mb(code)
    assert peak - baseline < 100, (baseline, peak)  # the old read_bytes() cost 2 GB here


def test_tool_specs_round_trip(box):
    _, _, reg = box
    json.dumps(reg.specs())


def test_absolute_path_through_a_link_above_the_workspace(tmp_path):
    """macOS /var -> /private/var: the workspace's own path spelled through a link still works."""
    real = tmp_path / "real_ws"
    real.mkdir()
    (real / "a.txt").write_text("here\n")
    os.symlink(real, tmp_path / "alias_ws")
    reg = ToolRegistry(builtin_tools(Workspace(tmp_path / "alias_ws"), sandbox=NONE))
    assert run(reg, "read_file", path=str(tmp_path / "alias_ws" / "a.txt")).output == "here\n"
    w = run(reg, "write_file", path=str(tmp_path / "alias_ws" / "b.txt"), content="b")
    assert w.status == "ok" and (real / "b.txt").read_text() == "b"
    r = run(reg, "read_file", path=str(tmp_path / "alias_ws" / ".." / "real_ws" / ".." / "x"))
    assert r.status == "refused"
