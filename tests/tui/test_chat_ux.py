"""Terminal chat items of issue 13, in Pilot: focus after Esc on an approval card, the welcome
line, /help reachable to its last line at 36 and 24 rows, "tools N" on an 80x24 status bar,
Ctrl+Q asking before it drops a draft, resumed sessions labelled with their model, /tools
under --ask-all, and the approval card saying whether run_shell is sandboxed."""
from __future__ import annotations

import html
import json
import re

import pytest
from tui_helpers import aiter_events, parsed_events, tool_call_text, wait_for

from k2mlx.tui.app import ChatApp
from k2mlx.tui.messages import ChatMessage, ReplyStats
from k2mlx.tui.screens.confirm import ConfirmQuit
from k2mlx.tui.screens.help import HINT, HelpScreen
from k2mlx.tui.sessions import SessionStore
from k2mlx.tui.tools import ToolRegistry, builtin_tools
from k2mlx.tui.tools.sandbox import NONE, detect
from k2mlx.tui.widgets.chat import AssistantMessage, SystemNote
from k2mlx.tui.widgets.prompt import PromptInput
from k2mlx.tui.widgets.toolcard import ToolCard


def no_model(progress):
    raise RuntimeError("no model in this test")


@pytest.fixture()
def offline_app(tmp_path, workspace):
    """An app whose model never starts: enough for everything that does not generate."""
    def make(**kw):
        kw.setdefault("store", SessionStore(tmp_path / "ux.db"))
        return ChatApp(backend=None, connect=no_model, workspace=workspace, **kw)

    return make


def screen_rows(app) -> list[str]:
    """The rows on screen now, as text (from Textual's own SVG export)."""
    svg = app.export_screenshot()
    rows: dict[float, list] = {}
    for m in re.finditer(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(float(m.group(2)), []).append((float(m.group(1)), html.unescape(m.group(3))))
    return ["".join(t for _, t in sorted(parts)).replace("\xa0", " ") for _, parts in sorted(rows.items())]


async def awaiting_card(pilot, app, tokenizer, call):
    app.start_turn(aiter_events(parsed_events(tokenizer, tool_call_text(call))))
    await wait_for(pilot, lambda: any(c.status == "awaiting" for c in app.query(ToolCard)), what="the approval card")
    card = app.query(ToolCard).last()
    assert app.focused is card
    return card


async def test_escape_on_an_approval_card_gives_the_focus_back(offline_app, workspace, tiny_tokenizer):
    app = offline_app(max_tool_steps=1)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.ready.is_set(), what="the connection attempt")
        args = json.dumps({"path": "x.txt", "content": "never\n"})
        card = await awaiting_card(pilot, app, tiny_tokenizer, ("write_file", args))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.generating, what="the turn to stop")
        assert card.status == "cancelled" and not (workspace / "x.txt").exists()
        assert isinstance(app.focused, PromptInput)
        await pilot.press(*"typed after esc")
        assert app.query_one(PromptInput).text == "typed after esc"


async def test_welcome_line_on_open(offline_app):
    app = offline_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)
        first = app.query(SystemNote).first()
        assert first.has_class("welcome") and "/help" in first.source and "Enter sends" in first.source
        assert any("/help" in row for row in screen_rows(app))


@pytest.mark.parametrize("size", [(80, 36), (80, 24)])
async def test_help_is_reachable_to_its_last_line(offline_app, size):
    from k2mlx.tui.commands import COMMANDS

    app = offline_app()
    async with app.run_test(size=size) as pilot:
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="the help screen")
        await pilot.pause(0.3)
        seen = set()
        for _ in range(30):  # page through with the keyboard alone
            rows = screen_rows(app)
            assert any(HINT in r for r in rows), rows  # the way to scroll is always on screen
            seen.update(rows)
            await pilot.press("pagedown")
            await pilot.pause(0.05)
        text = "\n".join(seen)
        body = app.screen.query_one("#help-body")
        assert body.max_scroll_y > 0 and body.scroll_y == body.max_scroll_y
        for name, _ in COMMANDS:
            assert name in text, name
        for key in ("Ctrl+R", "Ctrl+Q", "y / a / n", "context used of the"):
            assert key in text, key
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help to close")


async def test_tools_count_fits_at_80_columns(offline_app):
    app = offline_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)
        app.status.set(model="kimi-k2-instruct-0905-mlx-4bit-long-name", state="approve? y/a/n", limit=131072,
                       stats=ReplyStats(12345, 100, 0, 1234.5, 23.4, measured="client"))
        await pilot.pause(0.1)
        bar = screen_rows(app)[-1]
        assert "tools 8" in bar and "ctx 12.4k/131.1k" in bar and "approve? y/a/n" in bar, bar
        assert "dec ~23.4" in bar and bar.lstrip().startswith("kimi-k")  # the model name gives way first
        app.status.set(state="")
        await pilot.pause(0.1)
        bar = screen_rows(app)[-1]
        assert "kimi-k2-instruct" in bar and bar.rstrip().endswith("tools 8"), bar


async def test_ctrl_q_with_a_draft_asks_first(offline_app):
    app = offline_app()
    async with app.run_test(size=(80, 24)) as pilot:
        prompt = app.query_one(PromptInput)
        await pilot.press(*"half a thought")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the question")
        assert app.return_code is None
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmQuit), what="the question to close")
        assert prompt.text == "half a thought" and app.focused is prompt and app.return_code is None
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the question")
        await pilot.press("y")
        await wait_for(pilot, lambda: app.return_code is not None, what="the app to quit")


async def test_ctrl_q_without_a_draft_quits_at_once(offline_app):
    app = offline_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app.return_code is not None, what="the app to quit")


async def test_resumed_session_is_labelled_with_its_model(offline_app, tmp_path):
    store = SessionStore(tmp_path / "resume.db")
    sid = store.create(model="kimi-k2-instruct-0905")
    store.add_message(sid, ChatMessage("user", "hi"))
    store.add_message(sid, ChatMessage("assistant", "hello there", finish_reason="stop"))
    app = offline_app(store=store, resume=sid)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: bool(app.query(AssistantMessage)), what="the history")
        (reply,) = app.query(AssistantMessage)
        assert reply.label == "kimi-k2-instruct-0905"
        assert str(reply.query_one(".role").render()) == "kimi-k2-instruct-0905"


async def test_tools_listing_follows_the_approval_policy(offline_app):
    from test_commands import command

    app = offline_app(ask_all=True)
    async with app.run_test(size=(100, 30)) as pilot:
        listing = await command(pilot, app, "/tools")
        assert "read-only" not in listing
        lines = {line.split("`")[1]: line for line in listing.splitlines() if line.startswith("- `")}
        assert all("asks first" in line or "asks every time" in line for line in lines.values()), listing
    app = offline_app()
    async with app.run_test(size=(100, 30)) as pilot:
        listing = await command(pilot, app, "/tools")
        lines = {line.split("`")[1]: line for line in listing.splitlines() if line.startswith("- `")}
        assert "runs without asking (read-only)" in lines["read_file"] and "asks first" in lines["write_file"]
        assert "sandbox" in listing.lower()


async def test_approval_card_says_whether_run_shell_is_sandboxed(offline_app, workspace, tiny_tokenizer):
    app = offline_app(max_tool_steps=1)
    app.registry = ToolRegistry(builtin_tools(app.workspace, sandbox=NONE))
    shell = json.dumps({"command": "touch made.txt"})
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.ready.is_set(), what="the connection attempt")
        card = await awaiting_card(pilot, app, tiny_tokenizer, ("run_shell", shell))
        assert "NO SANDBOX" in str(card.query_one(".tool-sandbox").render())
        assert not card.query("#always") and not card.query("#network")
        assert app.status.state == "approve? y/n" and "Allow once [y]" in str(card.query_one("#once").label)
        await pilot.press("a")  # "always" is not on offer: nothing happens
        await pilot.pause(0.2)
        assert card.status == "awaiting" and not (workspace / "made.txt").exists()
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.generating, what="the turn to end")
        assert card.status == "ok" and (workspace / "made.txt").exists()
        assert app.policy.always == set()
        box = detect()
        if box.active:  # the sandboxed card names its sandbox and offers the network once
            from test_sandbox import _Listener

            app.registry = ToolRegistry(builtin_tools(app.workspace, sandbox=box))
            server = _Listener()
            connect = json.dumps({"command": "python3 -c \"import socket; socket.create_connection("
                                             f"('127.0.0.1', {server.port}), 3)\""})
            try:
                for key, hits, status in (("y", 0, "error"), ("w", 1, "ok")):  # w: once, network on
                    card = await awaiting_card(pilot, app, tiny_tokenizer, ("run_shell", connect))
                    assert box.kind in str(card.query_one(".tool-sandbox").render())
                    assert card.query("#always") and card.query("#network")
                    assert app.status.state == "approve? y/w/a/n"
                    await pilot.press(key)
                    await wait_for(pilot, lambda: not app.generating, what="the turn to end")
                    assert card.status == status and server.hits == hits, (key, card.result)
            finally:
                server.sock.close()
