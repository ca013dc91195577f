"""The k2mlx terminal chat and agent (Textual).

It reaches the model only through the OpenAI-style HTTP interface (`backend.Backend`), local
in-process or remote. A turn runs in a worker: stream the reply into the conversation, run the
tool calls it asked for (cards, approval), send the results back, repeat until the model stops
calling tools (bounded). Every message is saved to SQLite as soon as it is complete."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.worker import Worker

from k2mlx.engine.events import (Done, ParseWarning, ReasoningDelta, TextDelta, ToolCallArgsDelta, ToolCallBegin,
                                 ToolCallEnd)
from k2mlx.tui.commands import COMMANDS, dispatch
from k2mlx.tui.screens.confirm import ConfirmQuit
from k2mlx.tui.messages import ChatMessage, ReplyStats, ToolCall, ToolResult
from k2mlx.tui.sessions import SessionStore
from k2mlx.tui.tools import ApprovalPolicy, Decision, ToolRefused, ToolRegistry, Workspace, builtin_tools, call_tool
from k2mlx.tui.widgets.chat import AssistantMessage, Conversation, SystemNote, UserMessage
from k2mlx.tui.widgets.prompt import PromptInput, SlashCompletions
from k2mlx.tui.widgets.status import ClusterPanel, StatusBar
from k2mlx.tui.widgets.toolcard import ToolCard, history_preview

HERE = Path(__file__).parent
WELCOME = ("Enter sends · Ctrl+J new line · Esc stops · y/a/n answer a tool · Ctrl+R resumes · "
           "Ctrl+Q quits · /help for commands and keys")
DEFAULT_SYSTEM = ("You are Kimi, an AI assistant created by Moonshot AI, running locally through k2mlx. "
                  "You can use tools to read, search and edit files in the user's workspace and run commands there.")


class ChatApp(App):
    TITLE = "k2mlx chat"
    CSS_PATH = [HERE / "app.tcss", HERE / "widgets" / "chat.tcss", HERE / "widgets" / "toolcard.tcss",
                HERE / "widgets" / "prompt.tcss", HERE / "widgets" / "status.tcss", HERE / "screens" / "picker.tcss",
                HERE / "screens" / "help.tcss", HERE / "screens" / "confirm.tcss"]
    BINDINGS = [Binding("escape", "stop", "Stop"), Binding("ctrl+q", "quit", "Quit", priority=True),
                Binding("ctrl+r", "resume", "Resume"), Binding("f1", "help", "Help")]
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, *, backend=None, connect: Optional[Callable] = None, store: SessionStore | None = None,
                 workspace: str | Path = ".", mcp_servers: dict | None = None, resume: str | None = None,
                 temperature: float = 0.6, system: str | None = None, max_tokens: int | None = None,
                 auto_approve: bool = False, ask_all: bool = False, max_tool_steps: int = 8, model_label: str | None = None,
                 cluster_poll_s: float = 5.0):
        super().__init__()
        self.backend = backend
        self.connect = connect
        self.store = store or SessionStore()
        self.workspace = Workspace(workspace)
        self.registry = ToolRegistry(builtin_tools(self.workspace))
        self.policy = ApprovalPolicy(auto_approve, ask_all)
        self.mcp_servers = mcp_servers or {}
        self.mcp = None
        self.resume_id = resume
        self.temperature = temperature
        self.system = DEFAULT_SYSTEM if system is None else system
        self.max_tokens = max_tokens
        self.max_tool_steps = max_tool_steps
        self.model_label = model_label
        self.cluster_poll_s = cluster_poll_s
        self.messages: list[ChatMessage] = []
        self.session_id: str | None = None
        self.session_model = ""  # the model a resumed session recorded
        self.stats: ReplyStats | None = None
        self.ready = asyncio.Event()
        self.turn_worker: Worker | None = None
        self.cluster_info: dict | None = None
        self.turns_done = 0  # turns finished (tests wait on this)
        self.last_deltas = 0

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Conversation(id="conversation")
                yield SlashCompletions(id="completions")
                yield PromptInput(COMMANDS, id="prompt")
            yield ClusterPanel(id="cluster")
        yield StatusBar(id="status")

    @property
    def conversation(self) -> Conversation:
        return self.query_one(Conversation)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    async def on_mount(self) -> None:
        self.conversation.anchor()
        self.query_one(PromptInput).focus()
        self.status.set(tools=len(self.registry.tools))
        await self.note(WELCOME, classes="welcome")
        self.run_worker(self._connect(), group="connect", exit_on_error=False)
        if self.mcp_servers:
            self.run_worker(self._start_mcp(), group="mcp", exit_on_error=False)
        if self.resume_id:
            sid = self.resume_id
            if sid == "latest":
                latest = self.store.latest()
                sid = latest.id if latest else None
            if sid:
                await self.load_session(sid)
            else:
                await self.note("no saved session to resume; starting a new one")

    async def on_unmount(self) -> None:
        if self.mcp is not None:
            await self.mcp.stop()
        if self.backend is not None:
            await self.backend.client.close()  # the in-process server itself is stopped by `k2mlx chat`

    # ------------------------------------------------------------------ connection
    async def _connect(self) -> None:
        remote = self.backend is not None  # given an endpoint, not starting a local model
        try:
            if self.backend is None:
                self.status.set(model="k2mlx", state="starting…")

                def progress(msg: str) -> None:
                    self.call_from_thread(self.status.set, state=msg + "…")

                self.backend = await asyncio.to_thread(self.connect, progress)
            try:
                await self.backend.refresh_models()
            except Exception as e:  # a remote endpoint down: say so, keep the UI usable
                await self.note(f"could not list models at {self.backend.base_url}: {e}", error=True)
            self.status.set(model=self.model_label or self.backend.display_name, limit=self.backend.context_limit,
                            state="")
            await self.refresh_cluster(auto=True)
        except Exception as e:
            self.status.set(state="not connected")
            what = f"could not reach {self.backend.base_url}" if remote else "could not start the model"
            await self.note(f"{what}: {e}", error=True)
            return
        finally:
            self.ready.set()
        if self.cluster_info is not None and self.cluster_poll_s:
            self.set_interval(self.cluster_poll_s, self.refresh_cluster)

    async def refresh_cluster(self, auto: bool = False) -> Optional[dict]:
        if self.backend is None:
            return None
        info = await self.backend.cluster()
        self.cluster_info = info
        panel = self.query_one(ClusterPanel)
        if info is not None:
            panel.show_info(info)
            if auto:
                panel.display = self.size.width >= 100  # narrow screens: /cluster shows it
        return info

    async def _start_mcp(self) -> None:
        from k2mlx.tui.mcp import MCPManager

        self.mcp = MCPManager(self.mcp_servers)
        tools = await self.mcp.start()
        for t in tools:
            self.registry.add(t)
        for s in self.mcp.servers:
            if s.error:
                await self.note(f"MCP server '{s.name}' did not start: {s.error}", error=True)
        self.status.set(tools=len(self.registry.tools) if self.registry.enabled else 0)

    # ------------------------------------------------------------------ conversation helpers
    async def note(self, text: str, *, error: bool = False, markdown: bool = False, classes: str = "") -> SystemNote:
        w = SystemNote(text, markdown=markdown, classes=" ".join(c for c in ("error" if error else "", classes) if c))
        await self.conversation.mount(w)
        return w

    def wire_messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m.to_openai() for m in self.messages]

    def save(self, msg: ChatMessage) -> None:
        if self.session_id is None:
            self.session_id = self.store.create(model=self.backend.display_name if self.backend else "",
                                                workspace=str(self.workspace.root), system=self.system)
        self.store.add_message(self.session_id, msg)

    def add_message(self, msg: ChatMessage) -> None:
        self.messages.append(msg)
        self.save(msg)

    async def stop_turn(self) -> None:
        """Stop a running reply (and its tools) and wait until it has saved what it had."""
        if self.generating:
            worker = self.turn_worker
            worker.cancel()
            with contextlib.suppress(Exception):
                await worker.wait()

    async def clear_conversation(self) -> None:
        await self.stop_turn()
        self.policy.always.clear()  # "allow always" holds for one chat session, not the next
        await self.conversation.remove_children()
        self.messages = []
        self.session_id = None
        self.stats = None
        self.status.set(stats=None)

    async def load_session(self, session_id: str) -> bool:
        info = self.store.get(session_id)
        if info is None:
            await self.note(f"no session '{session_id}'", error=True)
            return False
        await self.clear_conversation()
        self.session_id = info.id
        self.system = info.system
        self.session_model = info.model
        self.messages = self.store.messages(info.id)
        await self.render_history(self.messages, label=info.model or self._label())
        await self.note(f"resumed session {info.id}: {info.title} ({len(self.messages)} messages)")
        return True

    async def render_history(self, messages: list[ChatMessage], label: str | None = None) -> None:
        """`label`: who said the assistant lines (the session's recorded model)."""
        cards: dict[str, ToolCard] = {}
        widgets = []
        for m in messages:
            if m.role == "user":
                widgets.append(UserMessage(m.content))
            elif m.role == "assistant":
                if m.content or m.reasoning or not m.tool_calls:
                    note = {"cancelled": "stopped", "length": "cut at max tokens"}.get(m.finish_reason or "", "")
                    widgets.append(AssistantMessage(m.content, m.reasoning, label=label or self._label(), note=note))
                for c in m.tool_calls:
                    tool = self.registry.get(c.name)
                    cards[c.id] = ToolCard(c, source=tool.source if tool else "built-in", preview=history_preview(c))
                    widgets.append(cards[c.id])
        await self.conversation.mount_all(widgets)
        for m in messages:
            if m.role == "tool" and m.tool_call_id in cards:
                cards[m.tool_call_id].set_result(ToolResult(m.finish_reason or "ok", m.content))

    def _label(self) -> str:
        if self.model_label:
            return self.model_label
        if self.backend is not None:
            return self.backend.display_name
        return self.session_model or "assistant"  # still connecting: the session's model, if resumed

    # ------------------------------------------------------------------ input
    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        self.query_one(SlashCompletions).display = False
        if text.startswith("/"):
            await dispatch(self, text.strip())
            return
        if self.generating:
            self.notify("a reply is still running: Esc stops it", severity="warning")
            return
        self.add_message(ChatMessage("user", text))
        await self.conversation.mount(UserMessage(text))
        self.conversation.scroll_end(animate=False)
        self.start_turn()

    @property
    def generating(self) -> bool:
        return self.turn_worker is not None and not self.turn_worker.is_finished

    def start_turn(self, first_reply: AsyncIterator | None = None) -> Worker:
        self.turn_worker = self.run_worker(self._turn(first_reply), group="turn", exclusive=True,
                                           exit_on_error=False)
        return self.turn_worker

    def action_stop(self) -> None:
        if self.generating:
            self.turn_worker.cancel()  # a tool waiting for approval is cancelled with the turn, never run
        self.query_one(PromptInput).focus()  # back to typing (the approval card had the focus)

    async def action_quit(self) -> None:
        """Ctrl+Q: quit, but ask first if the input holds an unsent draft."""
        if not self.query_one(PromptInput).text.strip() or isinstance(self.screen, ConfirmQuit):
            self.exit()
            return

        def answered(quit_: bool | None) -> None:
            if quit_:
                self.exit()
            else:
                self.query_one(PromptInput).focus()

        self.push_screen(ConfirmQuit(), answered)

    def action_resume(self) -> None:
        self.run_worker(dispatch(self, "/resume"), group="cmd")

    def action_help(self) -> None:
        self.run_worker(dispatch(self, "/help"), group="cmd")

    # ------------------------------------------------------------------ one turn
    async def _turn(self, first_reply: AsyncIterator | None = None) -> None:
        self.status.set(state="generating…")
        replies = 0
        try:
            await self.ready.wait()
            if self.backend is None and first_reply is None:
                await self.note("no model connected", error=True)
                return
            for step in range(self.max_tool_steps + 1):
                replies = step
                tools = self.registry.specs() if step < self.max_tool_steps else []
                events = first_reply if (step == 0 and first_reply is not None) else self.backend.stream(
                    self.wire_messages(), tools=tools, temperature=self.temperature, max_tokens=self.max_tokens)
                msg = await self.stream_reply(events)
                if msg is None or not msg.tool_calls:
                    break
                await self.run_tool_calls(msg)
            else:
                await self.note(f"stopped after {self.max_tool_steps} rounds of tool calls")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # HTTP errors, context overflow (400): show, keep the chat usable
            message = getattr(e, "message", None) or str(e)
            if replies == 0 and first_reply is None:
                message += await self._unsend_prompt()
            await self.note(f"error: {message}", error=True)
        finally:
            self.turns_done += 1
            self.status.set(state="")

    async def _unsend_prompt(self) -> str:
        """The server refused the prompt outright: take it back out of the history (else every
        later request fails the same way) and put it back in the input to edit."""
        if not self.messages or self.messages[-1].role != "user":
            return ""
        msg = self.messages.pop()
        if self.session_id:
            self.store.delete_last(self.session_id, "user")
        views = list(self.query(UserMessage))
        if views and views[-1].text == msg.content:
            await views[-1].remove()
        for view in list(self.query(AssistantMessage))[-1:]:
            if not view.text and not view.reasoning:
                await view.remove()  # the empty reply it never got
        prompt = self.query_one(PromptInput)
        if not prompt.text:
            prompt.load_text(msg.content)
        return " (your message is back in the input)"

    async def stream_reply(self, events: AsyncIterator) -> Optional[ChatMessage]:
        """Show one streamed reply; save it complete (or as far as it got when stopped)."""
        view = AssistantMessage(label=self._label())
        await self.conversation.mount(view)
        msg = ChatMessage("assistant")
        self.last_deltas = 0  # how many pieces the reply arrived in (streaming, not one block)
        calls: dict[int, ToolCall] = {}
        done: Done | None = None
        # while the prompt is read, the status bar shows how far (a long agent prompt takes minutes)
        watch = asyncio.create_task(self._watch_prefill()) if self.backend is not None else None
        try:
            async with contextlib.aclosing(events) if hasattr(events, "aclose") else contextlib.nullcontext():
                async for ev in events:
                    if watch is not None:
                        watch.cancel()
                        watch = None
                        self.status.set(state="generating…")
                    if isinstance(ev, TextDelta):
                        self.last_deltas += 1
                        msg.content += ev.text
                        await view.append_text(ev.text)
                    elif isinstance(ev, ReasoningDelta):
                        msg.reasoning += ev.text
                        view.append_reasoning(ev.text)
                    elif isinstance(ev, ToolCallBegin):
                        calls[ev.index] = ToolCall(ev.id, ev.name, "")
                    elif isinstance(ev, ToolCallArgsDelta):
                        calls.setdefault(ev.index, ToolCall(f"call_{ev.index}", "", "")).arguments += ev.text
                    elif isinstance(ev, ToolCallEnd):
                        calls.setdefault(ev.index, ToolCall(f"call_{ev.index}", "", "")).arguments = ev.arguments
                    elif isinstance(ev, ParseWarning):
                        view.set_note(f"note: {ev.message}")
                    elif isinstance(ev, Done):
                        done = ev
        except asyncio.CancelledError:
            # stopped: keep what was said, drop tool calls that never finished
            msg.finish_reason = "cancelled"
            await view.finish()
            view.set_note("stopped")
            if msg.content or msg.reasoning:
                self.add_message(msg)
            raise
        finally:
            if watch is not None:
                watch.cancel()
        await view.finish()
        msg.tool_calls = [calls[i] for i in sorted(calls)]
        msg.finish_reason = done.finish_reason if done else "stop"
        if done is not None:
            self._record_stats(done)
            if done.finish_reason == "length":
                view.set_note("cut at max tokens")
            elif done.finish_reason == "error":
                view.set_note(f"error: {done.error or 'generation failed'}")
        if not (msg.content or msg.reasoning) and msg.tool_calls:
            await view.remove()  # the cards say it all
        self.add_message(msg)
        return msg

    PREFILL_POLL_S = 1.0  # the first look comes after this long: short prompts never show it

    async def _watch_prefill(self) -> None:
        """Poll the server's prefill progress until the reply's first event arrives."""
        while True:
            await asyncio.sleep(self.PREFILL_POLL_S)
            rows = await self.backend.prefill_status()
            if rows:
                r = max(rows, key=lambda x: x["total"])
                eta = r.get("eta_s")
                left = f", ~{eta:.0f} s left" if isinstance(eta, (int, float)) else ""
                self.status.set(state=f"reading prompt {r['done']:,}/{r['total']:,} tokens{left}")

    def _record_stats(self, done: Done) -> None:
        t, u = done.timings, done.usage
        if not (u.prompt_tokens or t.prefill_s or t.decode_s):
            return  # a reply that carried no numbers keeps the last ones on show
        source = getattr(self.backend, "last_timings_source", "server") if self.backend else "server"
        self.stats = ReplyStats(u.prompt_tokens, u.completion_tokens, u.cached_tokens, t.prefill_tps, t.decode_tps,
                                measured=source, constrained=done.constrained)
        self.status.set(stats=self.stats)

    async def run_tool_calls(self, msg: ChatMessage) -> None:
        pending = list(msg.tool_calls)
        try:
            while pending:
                call = pending[0]
                result = await self.run_one_tool(call)
                pending.pop(0)
                self.add_message(ChatMessage("tool", result.output, tool_call_id=call.id, name=call.name,
                                             finish_reason=result.status))
        except asyncio.CancelledError:
            # stopped while a tool waited or ran: every call gets an answer so the history stays valid
            for call in pending:
                self.add_message(ChatMessage("tool", "cancelled by the user", tool_call_id=call.id, name=call.name,
                                             finish_reason="cancelled"))
                card = self._card_for(call.id)
                if card is not None:
                    card.set_result(ToolResult("cancelled", "cancelled by the user"))
            raise

    def _card_for(self, call_id: str) -> Optional[ToolCard]:
        for card in self.query(ToolCard):
            if card.call.id == call_id:
                return card
        return None

    async def run_one_tool(self, call: ToolCall) -> ToolResult:
        tool = self.registry.get(call.name)
        preview, problem = None, None
        args: dict = {}
        if tool is None:
            problem = ToolResult("error", f"unknown tool '{call.name}'; available: {', '.join(self.registry.tools)}")
        else:
            try:
                args = call.parsed_arguments()
                if tool.preview is not None:
                    preview = tool.preview(args)  # also checks confinement: refused before anyone is asked
            except ToolRefused as e:
                problem = ToolResult("refused", str(e))
            except ValueError as e:
                problem = ToolResult("error", str(e))
        card = ToolCard(call, source=tool.source if tool else "built-in",
                        needs_approval=bool(tool and self.policy.guarded(tool)), preview=preview,
                        confinement=tool.confinement if tool else "", always_asks=bool(tool and tool.always_asks),
                        network_option=bool(tool and tool.network_option))
        await self.conversation.mount(card)
        self.conversation.scroll_end(animate=False)
        if problem is not None:
            card.set_result(problem)
            return problem
        if self.policy.needs_prompt(tool):
            self.status.set(state=f"approve? {card.keys}")
            decision = await card.ask()
            self.status.set(state="generating…")
            self.query_one(PromptInput).focus()
            if decision is Decision.DENY:
                result = ToolResult("denied", f"the user denied this call of {call.name}; it did not run")
                card.set_result(result)
                return result
            self.policy.record(tool, decision)
        else:
            decision = None
        card.set_status("running")
        result = await call_tool(tool, args, network=decision is Decision.NETWORK)
        card.set_result(result)
        return result
