"""Built-in agent tools on real files: what they do inside the workspace, and that every way
out of it (absolute paths, `..`, symlinks pointing out) is refused with a clear message and
without side effects."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from k2mlx.tui.messages import ToolCall
from k2mlx.tui.tools import ToolRegistry, Workspace, builtin_tools, call_tool


@pytest.fixture()
def setup(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET\n")
    (ws / "notes.txt").write_text("alpha\nbeta\ngamma\n")
    (ws / "src").mkdir()
    (ws / "src" / "main.py").write_text("def main():\n    return 41\n")
    os.symlink(outside, ws / "link_out")  # a directory link pointing out
    os.symlink(outside / "secret.txt", ws / "secret_link.txt")  # a file link pointing out
    reg = ToolRegistry(builtin_tools(Workspace(ws), shell_timeout=5))
    return ws, outside, reg


def run(reg, name, **args):
    return asyncio.run(call_tool(reg.get(name), args))


def test_read_list_glob_grep_inside(setup):
    ws, _, reg = setup
    r = run(reg, "read_file", path="notes.txt")
    assert r.status == "ok" and r.output == "alpha\nbeta\ngamma\n"
    assert run(reg, "read_file", path="notes.txt", offset=1, limit=1).output == "beta\n"
    assert run(reg, "read_file", path=str(ws / "src" / "main.py")).status == "ok"  # absolute inside is fine
    listing = run(reg, "list_dir", path=".").output
    assert "notes.txt" in listing and "src/" in listing and "link" in listing
    assert run(reg, "glob", pattern="**/*.py").output.splitlines() == ["src/main.py"]
    g = run(reg, "grep", pattern=r"return \d+")
    assert g.output == "src/main.py:2:     return 41"
    assert "TOP SECRET" not in run(reg, "grep", pattern="SECRET").output  # never greps through a link out


@pytest.mark.parametrize("tool,args", [
    ("read_file", {"path": "ABS/secret.txt"}),
    ("read_file", {"path": "../outside/secret.txt"}),
    ("read_file", {"path": "src/../../outside/secret.txt"}),
    ("read_file", {"path": "link_out/secret.txt"}),
    ("read_file", {"path": "secret_link.txt"}),
    ("list_dir", {"path": ".."}),
    ("list_dir", {"path": "link_out"}),
    ("grep", {"pattern": "SECRET", "path": "../outside"}),
    ("grep", {"pattern": "SECRET", "path": "link_out"}),
    ("glob", {"pattern": "../outside/*"}),
    ("glob", {"pattern": "ABS/*"}),
])
def test_reads_outside_are_refused(setup, tool, args):
    ws, outside, reg = setup
    args = {k: v.replace("ABS", str(outside)) for k, v in args.items()}
    r = run(reg, tool, **args)
    assert r.status == "refused", r
    assert "outside the workspace" in r.output and "TOP SECRET" not in r.output


@pytest.mark.parametrize("path,why", [("ABS/new.txt", "absolute path"), ("../outside/new.txt", "'..'"),
                                      ("link_out/new.txt", "symlink"), ("secret_link.txt", "symlink")])
def test_writes_outside_are_refused(setup, path, why):
    ws, outside, reg = setup
    path = path.replace("ABS", str(outside))
    r = run(reg, "write_file", path=path, content="pwned")
    assert r.status == "refused" and why in r.output, r
    e = run(reg, "edit_file", path=path, old_string="TOP", new_string="pwned")
    assert e.status == "refused" and "outside the workspace" in e.output
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"


@pytest.mark.parametrize("command,cwd", [
    ("cat ABS/secret.txt", None), ("cat ../outside/secret.txt", None), ("cat link_out/secret.txt", None),
    ("cat secret_link.txt", None), ("touch ../outside/made", None), ("cd .. && touch outside/made", None),
    ("echo x > ../outside/made", None), ("ls", ".."), ("ls", "link_out"), ("cp notes.txt ABS/made", None),
    ("python3 -c 'print(1)' --out=ABS/made", None),
])
def test_shell_outside_is_refused(setup, command, cwd):
    ws, outside, reg = setup
    args = {"command": command.replace("ABS", str(outside))}
    if cwd:
        args["cwd"] = cwd
    r = run(reg, "run_shell", **args)
    assert r.status == "refused", r
    assert "outside the workspace" in r.output
    assert sorted(os.listdir(outside)) == ["secret.txt"]


def test_write_edit_shell_inside(setup):
    ws, _, reg = setup
    w = run(reg, "write_file", path="out/new.txt", content="one\ntwo\n")
    assert w.status == "ok" and (ws / "out" / "new.txt").read_text() == "one\ntwo\n"
    assert "+one" in w.diff and "+two" in w.diff and "+++ b/out/new.txt" in w.diff
    e = run(reg, "edit_file", path="src/main.py", old_string="return 41", new_string="return 42")
    assert e.status == "ok" and (ws / "src" / "main.py").read_text() == "def main():\n    return 42\n"
    assert "-    return 41" in e.diff and "+    return 42" in e.diff
    missing = run(reg, "edit_file", path="src/main.py", old_string="return 41", new_string="x")
    assert missing.status == "refused" and "not found" in missing.output
    (ws / "dup.txt").write_text("a a a")
    assert "occurs 3 times" in run(reg, "edit_file", path="dup.txt", old_string="a", new_string="b").output
    assert run(reg, "edit_file", path="dup.txt", old_string="a", new_string="b", replace_all=True).status == "ok"
    assert (ws / "dup.txt").read_text() == "b b b"
    s = run(reg, "run_shell", command="echo hi && pwd")
    assert s.status == "ok" and s.output.splitlines()[:2] == ["hi", str(ws)] and "[exit code 0]" in s.output
    f = run(reg, "run_shell", command="exit 3")
    assert f.status == "error" and "[exit code 3]" in f.output


def test_shell_timeout_and_cap(setup):
    ws, _, reg = setup
    r = run(reg, "run_shell", command="sleep 30", timeout=0.5)
    assert r.status == "error" and "timed out after 0.5 s" in r.output and r.duration_s < 5
    big = run(reg, "run_shell", command="python3 -c \"print('x' * 100000)\"")
    assert big.status == "ok" and len(big.output) < 17_000 and "bytes cut" in big.output


def test_specs_are_openai_tools(setup):
    _, _, reg = setup
    specs = reg.specs()
    names = [s["function"]["name"] for s in specs]
    assert names == ["read_file", "list_dir", "glob", "grep", "write_file", "edit_file", "run_shell", "calculator"]
    for s in specs:
        assert s["type"] == "function" and s["function"]["parameters"]["type"] == "object"
        json.dumps(s)
    asks = {t.name for t in reg.tools.values() if t.needs_approval}
    assert asks == {"write_file", "edit_file", "run_shell"}
    reg.enabled = False
    assert reg.specs() == []


def test_calculator_evaluates_arithmetic_only(setup):
    _, _, reg = setup
    assert run(reg, "calculator", expression="17 * 23").output == "391"
    assert run(reg, "calculator", expression="(2 + 3) * -4 / 8").output == "-2.5"
    assert run(reg, "calculator", expression="10 / 4 * 2").output == "5"
    for bad, why in (("__import__('os').system('true')", "unsupported"), ("9 ** 9 ** 9", "too large"),
                     ("(10 ** 999) ** 999", "too large"), ("1 / 0", "division by zero"), ("x + 1", "unsupported")):
        r = run(reg, "calculator", expression=bad)
        assert r.status == "error" and why in r.output, (bad, r.output)
    assert run(reg, "calculator").status == "refused"  # missing argument


def test_ask_all_makes_read_only_tools_ask(setup):
    from k2mlx.tui.tools import ApprovalPolicy, Decision

    _, _, reg = setup
    default, ask_all = ApprovalPolicy(), ApprovalPolicy(ask_all=True)
    calc, shell = reg.get("calculator"), reg.get("run_shell")
    assert not default.needs_prompt(calc) and default.needs_prompt(shell)
    assert ask_all.needs_prompt(calc) and ask_all.needs_prompt(shell)
    ask_all.record(calc, Decision.ALWAYS)
    assert not ask_all.needs_prompt(calc) and ask_all.needs_prompt(shell)
    assert not ApprovalPolicy(auto_approve=True).needs_prompt(shell)
    with pytest.raises(ValueError, match="contradict"):
        ApprovalPolicy(auto_approve=True, ask_all=True)


def test_bad_arguments_are_results_not_crashes(setup):
    _, _, reg = setup
    assert run(reg, "read_file").status == "refused"  # missing path
    with pytest.raises(ValueError, match="not valid JSON"):
        ToolCall("x", "read_file", "{not json").parsed_arguments()
