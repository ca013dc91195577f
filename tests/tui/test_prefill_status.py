"""While the server reads a long prompt, the status bar shows how far it is (from the server's
own progress in GET /health), and then goes back to "generating…"."""
from __future__ import annotations

from tui_helpers import wait_for

from k2mlx.tui.app import ChatApp


class FastPoll(ChatApp):
    PREFILL_POLL_S = 0.05


async def test_status_bar_shows_prefill_progress(make_app, local_server):
    assert local_server.context_limit() > 3000
    app = make_app(FastPoll, max_tokens=2)
    states: list[str] = []
    async with app.run_test(size=(120, 30)) as pilot:
        real_set = app.status.set

        def spy(**fields):
            if "state" in fields:
                states.append(fields["state"])
            real_set(**fields)

        app.status.set = spy
        text = " ".join(f"note {i}: the mill by the river turns slowly." for i in range(250))  # ~3,000 tokens
        before = app.turns_done
        await pilot.click("#prompt")
        app.query_one("#prompt").insert(text)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turns_done > before, timeout=240, what="the reply")
    reading = [s for s in states if s.startswith("reading prompt ")]
    assert reading, states
    done, total = reading[-1][len("reading prompt "):].split(" tokens")[0].replace(",", "").split("/")
    assert 0 < int(done) <= int(total) and int(total) > 2500
    assert states.index(reading[0]) < len(states) - 1 and "generating…" in states[states.index(reading[0]):]


def test_status_bar_says_when_the_last_reply_was_schema_checked():
    """The server's `constrained` flag (a reply held to the tools' schemas) shows in the bar."""
    from k2mlx.tui.messages import ReplyStats
    from k2mlx.tui.widgets.status import StatusBar

    bar = StatusBar()
    bar.model, bar.tools = "k2-nano", 8
    bar.stats = ReplyStats(100, 10, 0, 500.0, 20.0)
    assert "schema" not in str(bar.render_text())
    bar.stats = ReplyStats(100, 10, 0, 500.0, 20.0, constrained=True)
    assert "schema-checked" in str(bar.render_text())
