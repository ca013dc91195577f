"""A tool call as a card: tool, arguments (or the diff it would make), what confines it
(run_shell: the sandbox, or that there is none), approval buttons, status, duration and result."""
from __future__ import annotations

import asyncio
import json

from rich.syntax import Syntax
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from k2mlx.tui.messages import ToolCall, ToolResult
from k2mlx.tui.tools.approval import Decision

ICONS = {"pending": "·", "awaiting": "?", "running": "…", "ok": "✓", "error": "✗", "refused": "⊘",
         "denied": "⊘", "cancelled": "⊘"}
RESULT_LINES = 12


def _args_view(call: ToolCall):
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return Text(call.arguments or "", style="red")
    if call.name == "run_shell" and isinstance(args, dict) and "command" in args:
        extra = {k: v for k, v in args.items() if k != "command"}
        return Text(f"$ {args['command']}" + (f"   {json.dumps(extra)}" if extra else ""), style="bold")
    if isinstance(args, dict) and call.name in ("write_file", "edit_file"):
        # the diff shows the content; only name the file here
        return Text(f"path: {args.get('path', '?')}")
    flat = json.dumps(args, ensure_ascii=False)
    text = flat if len(flat) <= 72 else json.dumps(args, indent=2, ensure_ascii=False)  # short args on one line
    return Syntax(text, "json", theme="ansi_dark", word_wrap=True, background_color="default")


def history_preview(call: ToolCall) -> str | None:
    """The diff a finished write/edit made, rebuilt from its arguments (history keeps no diffs)."""
    from k2mlx.tui.tools.builtin import unified_diff

    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(args, dict) or not isinstance(args.get("path"), str):
        return None
    if call.name == "write_file" and isinstance(args.get("content"), str):
        return unified_diff("", args["content"], args["path"])
    if call.name == "edit_file" and isinstance(args.get("old_string"), str) and isinstance(args.get("new_string"), str):
        return unified_diff(args["old_string"], args["new_string"], args["path"])
    return None


def _cap_lines(text: str, n: int) -> str:
    lines = text.splitlines()
    if len(lines) <= n:
        return text
    return "\n".join(lines[:n] + [f"… {len(lines) - n} more lines"])


class ToolCard(Vertical, can_focus=True):
    BINDINGS = [Binding("y", "decide('once')", "Allow once"), Binding("a", "decide('always')", "Allow always"),
                Binding("w", "decide('network')", "Allow once with network"),
                Binding("n", "decide('deny')", "Deny"), Binding("c", "copy", "Copy result")]

    def __init__(self, call: ToolCall, *, source: str = "built-in", needs_approval: bool = False,
                 preview: str | None = None, confinement: str = "", always_asks: bool = False,
                 network_option: bool = False, **kw):
        super().__init__(**kw)
        self.call = call
        self.source = source
        self.needs_approval = needs_approval
        self.preview = preview
        self.confinement = confinement  # the sandbox line (run_shell)
        self.always_asks = always_asks  # no sandbox: "always" is not offered
        self.network_option = network_option
        self.status = "pending"
        self.result: ToolResult | None = None
        self._future: asyncio.Future | None = None

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="tool-header")
        yield Static(_args_view(self.call), classes="tool-args")
        if self.confinement:
            yield Static(Text(self.confinement), classes="tool-sandbox" + (" -none" if self.always_asks else ""))
        diff = Static(self._diff(), classes="tool-diff")
        diff.display = bool(self.preview)
        yield diff
        with Horizontal(classes="approval"):
            yield Static("allow?", classes="ask")
            # Text labels: "[y]" is the key to press, not markup
            yield Button(Text("Allow once [y]"), id="once", variant="success", compact=True)
            if self.network_option:
                yield Button(Text("Once + network [w]"), id="network", variant="warning", compact=True)
            if not self.always_asks:
                yield Button(Text("Always [a]"), id="always", variant="primary", compact=True)
            yield Button(Text("Deny [n]"), id="deny", variant="error", compact=True)
        result = Static("", classes="tool-result")
        result.display = False
        yield result

    def on_mount(self) -> None:
        self.query_one(".approval").display = False

    def _diff(self):
        if not self.preview:
            return ""
        return Syntax(_cap_lines(self.preview.rstrip("\n"), 40), "diff", theme="ansi_dark", word_wrap=True,
                      background_color="default")

    def _header(self) -> Text:
        t = Text()
        t.append(f"{ICONS.get(self.status, '·')} ", style="bold")
        t.append(self.call.name, style="bold")
        if self.source != "built-in":
            t.append(f"  (mcp: {self.source})", style="dim")
        t.append(f"  {self.status}", style={"ok": "green", "error": "red", "refused": "red", "denied": "yellow",
                                             "awaiting": "yellow bold"}.get(self.status, "dim"))
        if self.result is not None and self.result.duration_s is not None:
            t.append(f"  {self.result.duration_s * 1000:.0f} ms" if self.result.duration_s < 1
                     else f"  {self.result.duration_s:.1f} s", style="dim")
        return t

    def set_status(self, status: str) -> None:
        self.status = status
        self.remove_class(*[f"-{s}" for s in ICONS])
        self.add_class(f"-{status}")
        self.query_one(".tool-header", Static).update(self._header())
        self.query_one(".approval").display = status == "awaiting"

    @property
    def keys(self) -> str:
        """The answer keys this card takes, for the status bar."""
        return "/".join(k for k, on in (("y", True), ("w", self.network_option), ("a", not self.always_asks),
                                        ("n", True)) if on)

    async def ask(self) -> Decision:
        """Show the approval bar and wait for the user's choice."""
        self._future = asyncio.get_running_loop().create_future()
        self.set_status("awaiting")
        self.focus()
        self.scroll_visible()
        try:
            return await self._future
        finally:
            self._future = None

    def action_decide(self, choice: str) -> None:
        if self._future is None or self._future.done():
            return
        if choice == "always" and self.always_asks:
            self.app.notify("no sandbox: this tool asks every time (y allows once)", severity="warning")
            return
        if choice == "network" and not self.network_option:
            return
        self._future.set_result(Decision(choice))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_decide(event.button.id)

    def set_result(self, result: ToolResult) -> None:
        self.result = result
        if result.diff and not self.preview:
            self.preview = result.diff
            d = self.query_one(".tool-diff", Static)
            d.update(self._diff())
            d.display = True
        self.set_status(result.status)
        body = self.query_one(".tool-result", Static)
        body.update(Text(_cap_lines(result.output, RESULT_LINES)))
        body.display = bool(result.output)

    def action_copy(self) -> None:
        text = self.result.output if self.result else self.call.arguments
        self.app.copy_to_clipboard(text)
        self.app.notify("copied", timeout=2)
