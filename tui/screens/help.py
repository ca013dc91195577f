"""The /help screen: slash commands and keys. Taller than a small terminal: it scrolls with the
keyboard (it has the focus) and a fixed last line says how, so nothing is silently cut off."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Markdown

HINT = "↑/↓ PgUp/PgDn Home/End scroll · Esc closes"

KEYS = """
| key | action |
|---|---|
| Enter | send (or complete a partial `/command`) |
| Ctrl+J, Shift+Enter | new line |
| Tab, Up/Down | complete / pick a slash command |
| Esc | stop the reply (a tool waiting for approval is cancelled, never run) |
| c | copy the focused message or tool result |
| y / a / n | allow once / allow always / deny a tool |
| w | allow a sandboxed run_shell once with the network on |
| Ctrl+R | resume a session |
| Ctrl+Q | quit (asks first if the input holds a draft) |

The status bar shows the model, prefill and decode tokens/s of the last reply (`~`: timed by
this app because the server sent no timings) and the context used of the model's limit.
"""


def help_markdown(commands: list[tuple[str, str]]) -> str:
    rows = "\n".join(f"| `{name}` | {text.replace('|', '&#124;')} |" for name, text in commands)
    return f"# k2mlx chat\n\n| command | what |\n|---|---|\n{rows}\n\n## Keys\n{KEYS}"


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "dismiss(None)", "Close")]

    def __init__(self, commands: list[tuple[str, str]]):
        super().__init__()
        self.commands = commands

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            with VerticalScroll(id="help-body"):
                yield Markdown(help_markdown(self.commands))
            yield Label(HINT, id="help-hint")

    def on_mount(self) -> None:
        self.query_one("#help-body").focus()  # the scroll keys work at once
