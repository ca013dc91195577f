"""The embedded k2-nano model really calling tools through the TUI, with the TUI's own tool
declarations and system prompt: a prompt, a model-made call, its card, approval, the tool run in
the workspace, and the model's answer stating the result. Skipped until k2-nano is installed
(k2mlx/assets/k2-nano)."""
from __future__ import annotations

import pytest
from tui_helpers import wait_for

from k2mlx.tiny import embedded_model_path
from k2mlx.tui.widgets.chat import AssistantMessage
from k2mlx.tui.widgets.toolcard import ToolCard

pytestmark = pytest.mark.skipif(not (embedded_model_path() / "config.json").is_file(),
                                reason="k2-nano is not installed in k2mlx/assets/k2-nano")


@pytest.fixture(scope="module")
def nano_server():
    from k2mlx.tui.local import LocalServer

    server = LocalServer(None, max_batch=1)  # None: the default model, k2-nano
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def nano_app(make_app, nano_server):
    from k2mlx.tui.backend import Backend

    def make(**kw):
        backend = Backend(nano_server.base_url, model=nano_server.model_name,
                          context_limit=nano_server.context_limit())
        return make_app(backend=backend, max_tokens=48, max_tool_steps=2, **kw)

    return make


async def _ask(pilot, app, text: str) -> None:
    await wait_for(pilot, lambda: app.ready.is_set(), what="the connection")
    app.query_one("#prompt").insert(text)
    await pilot.press("enter")


@pytest.mark.parametrize("a, op, b", [(17, "*", 23), (408, "+", 96), (75, "-", 128)])
async def test_nano_calculator_card_approval_answer(nano_app, a, op, b):
    """The issue's loop: the card appears, approving it runs the tool, the answer shows the result."""
    value = {"*": a * b, "+": a + b, "-": a - b}[op]
    app = nano_app(ask_all=True)  # the calculator is read-only: ask anyway, so approval is part of the loop
    async with app.run_test(size=(100, 30)) as pilot:
        before = app.turns_done
        await _ask(pilot, app, f"What is {a} {op} {b}?")
        await wait_for(pilot, lambda: len(app.query(ToolCard)) > 0, timeout=120, what="the tool card")
        card = app.query(ToolCard).first()
        assert card.call.name == "calculator", [m.to_openai() for m in app.messages]
        await wait_for(pilot, lambda: card.status == "awaiting", what="the approval prompt")
        await pilot.press("y")
        await wait_for(pilot, lambda: app.turns_done > before, timeout=120, what="the answer")
        assert card.status == "ok" and card.result.output == str(value)
        answer = list(app.query(AssistantMessage))[-1].text
        assert str(value) in answer, answer
        roles = [m.role for m in app.store.messages(app.session_id)]
        assert roles == ["user", "assistant", "tool", "assistant"]


async def test_nano_lists_a_folder(nano_app, workspace):
    (workspace / "docs").mkdir()
    (workspace / "docs" / "guide.md").write_text("# guide\n")
    app = nano_app()
    async with app.run_test(size=(100, 30)) as pilot:
        before = app.turns_done
        await _ask(pilot, app, "Show me the files in docs.")
        await wait_for(pilot, lambda: app.turns_done > before, timeout=120, what="the reply")
        cards = list(app.query(ToolCard))
        assert [c.call.name for c in cards] == ["list_dir"], [m.to_openai() for m in app.messages]
        assert cards[0].call.parsed_arguments() == {"path": "docs"}
        assert cards[0].status == "ok" and "guide.md" in cards[0].result.output  # read-only: no approval asked
        roles = [m.role for m in app.store.messages(app.session_id)]
        assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"


async def test_nano_three_turn_chat(nano_app, workspace):
    """One chat, three turns on k2-nano: a sum calls the calculator and states its result; then
    "Hi!" is answered in words (no tool call: the previous k2-nano called the calculator with
    made-up numbers); then a file question calls list_dir (not the calculator) on the folder."""
    (workspace / "docs").mkdir()
    (workspace / "docs" / "guide.md").write_text("# guide\n")
    app = nano_app()
    async with app.run_test(size=(100, 30)) as pilot:
        before = app.turns_done
        await _ask(pilot, app, "What is 17 * 23?")
        await wait_for(pilot, lambda: app.turns_done > before, timeout=120, what="the first answer")
        cards = list(app.query(ToolCard))
        assert [c.call.name for c in cards] == ["calculator"], [m.to_openai() for m in app.messages]
        assert cards[0].status == "ok" and cards[0].result.output == "391"
        assert "391" in list(app.query(AssistantMessage))[-1].text

        before = app.turns_done
        await _ask(pilot, app, "Hi!")
        await wait_for(pilot, lambda: app.turns_done > before, timeout=120, what="the greeting's reply")
        assert len(app.query(ToolCard)) == 1, [m.to_openai() for m in app.messages]
        greeting = list(app.query(AssistantMessage))[-1].text
        assert len(greeting.split()) >= 3, greeting

        before = app.turns_done
        await _ask(pilot, app, "Show me the files in docs.")
        await wait_for(pilot, lambda: app.turns_done > before, timeout=120, what="the file answer")
        cards = list(app.query(ToolCard))
        assert [c.call.name for c in cards] == ["calculator", "list_dir"], [m.to_openai() for m in app.messages]
        roles = [m.role for m in app.store.messages(app.session_id)]
        assert roles[:9] == ["user", "assistant", "tool", "assistant", "user", "assistant", "user", "assistant", "tool"]
        assert cards[1].call.parsed_arguments() == {"path": "docs"}
        assert cards[1].status == "ok" and "guide.md" in cards[1].result.output
