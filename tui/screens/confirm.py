"""Ctrl+Q with an unsent draft: ask before throwing it away."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class ConfirmQuit(ModalScreen[bool]):
    BINDINGS = [Binding("y,ctrl+q", "dismiss(True)", "Quit"), Binding("n,escape", "dismiss(False)", "Stay")]

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label("Quit and discard the message you have not sent?", id="confirm-text")
            with Horizontal(id="confirm-buttons"):
                yield Button("Quit [y]", id="quit", variant="error", compact=True)
                yield Button("Keep writing [n]", id="stay", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one("#stay", Button).focus()  # Enter keeps the draft: the safe default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "quit")
