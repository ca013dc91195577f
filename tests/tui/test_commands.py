"""Slash commands (with completion) and MCP tools, in Pilot against the real server."""
from __future__ import annotations

import json
import sys
import textwrap

from tui_helpers import aiter_events, parsed_events, tool_call_text, wait_for

from k2mlx.tui.screens.help import HelpScreen
from k2mlx.tui.screens.picker import SessionPicker
from k2mlx.tui.widgets.chat import SystemNote, UserMessage
from k2mlx.tui.widgets.prompt import PromptInput, SlashCompletions
from k2mlx.tui.widgets.toolcard import ToolCard


async def command(pilot, app, line: str):
    n = len(list(app.query(SystemNote)))
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.load_text(line)
    await pilot.press("enter")
    for _ in range(40):  # some commands wait on the server
        await pilot.pause(0.05)
        notes = list(app.query(SystemNote))
        if len(notes) > n:
            return notes[-1].source
    return None


async def test_completion(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.click("#prompt")
        await pilot.press("/", "t")
        box = app.query_one(SlashCompletions)
        assert box.display and "/temp" in str(box.render()) and "/tools" in str(box.render())
        await pilot.press("down", "tab")
        assert app.query_one(PromptInput).text == "/tools "
        app.query_one(PromptInput).load_text("/he")
        await pilot.press("enter")  # Enter on a partial command completes it
        assert app.query_one(PromptInput).text == "/help "
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="the help screen")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help to close")
        # multi-line input: Ctrl+J adds a line, Enter sends it all
        before = app.turns_done
        await pilot.press(*"line one", "ctrl+j", *"line two", "enter")
        await wait_for(pilot, lambda: app.turns_done > before, what="the reply")
        assert [w.text for w in app.query(UserMessage)] == ["line one\nline two"]
        assert app.query_one(PromptInput).text == ""


async def test_slash_commands(make_app, workspace):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.ready.is_set(), what="the connection")
        assert "temperature: 0" in await command(pilot, app, "/temp")
        assert "set to 0.3" in await command(pilot, app, "/temp 0.3") and app.temperature == 0.3
        assert "must be a number from 0 to 2" in await command(pilot, app, "/temp hot") and app.temperature == 0.3
        assert await command(pilot, app, "/system Answer in French.") == "system prompt set"
        assert app.wire_messages()[0] == {"role": "system", "content": "Answer in French."}
        listing = await command(pilot, app, "/tools")
        for name in ("read_file", "list_dir", "glob", "grep", "write_file", "edit_file", "run_shell", "calculator"):
            assert f"`{name}`" in listing
        assert "hidden from" in await command(pilot, app, "/tools off") and app.registry.specs() == []
        await command(pilot, app, "/tools on")
        model = await command(pilot, app, "/model")
        assert app.backend.model in model and app.backend.base_url in model
        assert "has no model 'nope'" in await command(pilot, app, "/model nope")
        assert "not attached to a cluster" in await command(pilot, app, "/cluster")
        assert "unknown command /frob" in await command(pilot, app, "/frob")
        assert "nothing to export" in await command(pilot, app, "/export")

        # a real exchange, then export, clear and resume through the picker
        prompt = app.query_one(PromptInput)
        prompt.load_text("Bonjour")
        before = app.turns_done
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turns_done > before, what="the reply")
        sid = app.session_id
        note = await command(pilot, app, "/export chat.md")
        md = (workspace / "chat.md").read_text()
        assert "exported to" in note and "## User\n\nBonjour" in md and "## System\n\nAnswer in French." in md
        await command(pilot, app, "/clear")
        assert app.messages == [] and app.session_id is None and not list(app.query(UserMessage))
        await command(pilot, app, "/resume")
        await wait_for(pilot, lambda: isinstance(app.screen, SessionPicker), what="the picker")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.session_id == sid, what="the resumed session")
        assert [w.text for w in app.query(UserMessage)] == ["Bonjour"]
        await command(pilot, app, "/quit")
    assert app.return_code == 0


MCP_SERVER = textwrap.dedent('''
    try:
        from mcp.server.mcpserver import MCPServer as Server  # mcp >= 2
    except ImportError:
        from mcp.server.fastmcp import FastMCP as Server  # mcp 1.x
    app = Server("calc")

    @app.tool()
    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    if __name__ == "__main__":
        app.run("stdio")
''')


async def test_mcp_tool_is_shown_and_approved(make_app, tmp_path, tiny_tokenizer):
    from k2mlx.tui.mcp import load_config

    script = tmp_path / "calc_server.py"
    script.write_text(MCP_SERVER)
    cfg = tmp_path / "mcp.json"
    cfg.write_text(json.dumps({"mcpServers": {"calc": {"command": sys.executable, "args": [str(script)]}}}))
    app = make_app(mcp_servers=load_config(cfg), max_tool_steps=1)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.registry.get("add") is not None, timeout=60, what="the MCP tool")
        assert app.registry.get("add").source == "calc"
        assert "add" in [s["function"]["name"] for s in app.registry.specs()]
        assert "(MCP: calc)" in await command(pilot, app, "/tools")
        events = parsed_events(tiny_tokenizer, tool_call_text(("add", json.dumps({"a": 2, "b": 40}))))
        app.start_turn(aiter_events(events))
        await wait_for(pilot, lambda: bool(list(app.query(ToolCard))), what="the card")
        card = app.query_one(ToolCard)
        await wait_for(pilot, lambda: card.status == "awaiting", what="approval")  # MCP tools ask like built-ins
        assert "mcp: calc" in str(card.query_one(".tool-header").render())
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.generating, what="the turn")
        assert card.status == "ok" and card.result.output == "42"
        tool_msg = [m for m in app.messages if m.role == "tool"][0]
        assert tool_msg.content == "42" and tool_msg.name == "add"


async def test_errors_are_shown_and_the_chat_goes_on(make_app, local_server):
    from k2mlx.tui.backend import Backend

    # too long for the model: the server's 400 names both numbers, and the app says so
    app = make_app()
    limit = local_server.context_limit()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.ready.is_set(), what="the connection")
        prompt = app.query_one(PromptInput)
        before = app.turns_done
        prompt.load_text("tok " * (limit + 100))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turns_done > before, what="the error")
        note = list(app.query(SystemNote))[-1].source
        assert note.startswith("error:") and str(limit) in note and "prompt is" in note, note
        assert note.endswith("(your message is back in the input)") and prompt.text.startswith("tok tok")
        assert app.messages == [] and not list(app.query(UserMessage))  # refused: not part of the history
        before = app.turns_done
        prompt.load_text("hello")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turns_done > before, what="the reply")
        assert app.messages[-1].role == "assistant"

    # an endpoint that is not there: said once at start and per prompt, never a crash
    app = make_app(backend=Backend("http://127.0.0.1:9/v1"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.ready.is_set(), what="the connection attempt")
        assert "could not list models at http://127.0.0.1:9/v1" in list(app.query(SystemNote))[1].source  # after the welcome line
        # an endpoint was given: no note may talk about starting a (local) model
        assert not any("could not start the model" in n.source for n in app.query(SystemNote))
        before = app.turns_done
        app.query_one(PromptInput).load_text("anyone there?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turns_done > before, what="the error")
        assert list(app.query(SystemNote))[-1].source.startswith("error: Connection error")
        assert app.query_one(PromptInput).text == "anyone there?"
