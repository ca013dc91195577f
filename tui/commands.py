"""Slash commands: `/name args`. COMMANDS feeds the completion list and /help."""
from __future__ import annotations

from pathlib import Path

COMMANDS: list[tuple[str, str]] = [
    ("/help", "commands and keys"),
    ("/model", "show the model, or /model NAME to switch"),
    ("/system", "show the system prompt, or /system TEXT to set it (/system clear)"),
    ("/temp", "show the temperature, or /temp 0.6 to set it"),
    ("/tools", "list tools; /tools on|off to offer them to the model"),
    ("/clear", "start a new session (the old one stays saved)"),
    ("/resume", "pick a saved session, or /resume ID"),
    ("/export", "write this session as Markdown (/export PATH)"),
    ("/cluster", "show or hide the cluster panel"),
    ("/quit", "leave"),
]


async def dispatch(app, line: str) -> None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    handler = HANDLERS.get(name)
    if handler is None:
        close = [n for n, _ in COMMANDS if n.startswith(name)]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (/help lists them)"
        await app.note(f"unknown command {name}{hint}", error=True)
        return
    await handler(app, arg)


async def cmd_help(app, arg):
    from k2mlx.tui.screens.help import HelpScreen

    await app.push_screen(HelpScreen(COMMANDS))


async def cmd_model(app, arg):
    b = app.backend
    if b is None:
        await app.note("no model connected yet")
        return
    if not arg:
        try:
            await b.refresh_models()
        except Exception as e:
            await app.note(f"could not list models: {e}", error=True)
        where = "in-process" if b.local is not None else b.base_url
        listed = ", ".join(f"*{m}*" if m == b.model else m for m in b.models) or "?"
        limit = f", context {b.context_limit} tokens" if b.context_limit else ""
        await app.note(f"model: {b.model} ({where}{limit}); available: {listed}")
        return
    if b.models and arg not in b.models:
        await app.note(f"the endpoint has no model '{arg}'; available: {', '.join(b.models)}", error=True)
        return
    b.model = arg
    app.model_label = None
    app.status.set(model=arg)
    await app.note(f"model set to {arg}")


async def cmd_system(app, arg):
    if not arg:
        await app.note(f"system prompt: {app.system or '(none)'}")
        return
    app.system = "" if arg == "clear" else arg
    if app.session_id:
        app.store.update_session(app.session_id, system=app.system)
    await app.note("system prompt cleared" if not app.system else "system prompt set")


async def cmd_temp(app, arg):
    if not arg:
        await app.note(f"temperature: {app.temperature:g}")
        return
    try:
        value = float(arg)
        if not 0.0 <= value <= 2.0:
            raise ValueError
    except ValueError:
        await app.note(f"temperature must be a number from 0 to 2, got '{arg}'", error=True)
        return
    app.temperature = value
    await app.note(f"temperature set to {value:g}")


async def cmd_tools(app, arg):
    reg = app.registry
    if arg in ("on", "off"):
        reg.enabled = arg == "on"
        app.status.set(tools=len(reg.tools) if reg.enabled else 0)
        await app.note(f"tools {'offered to' if reg.enabled else 'hidden from'} the model")
        return
    lines = [f"tools ({'on' if reg.enabled else 'off'}), workspace `{app.workspace.root}`:", ""]
    for t in reg.tools.values():
        src = "" if t.source == "built-in" else f" (MCP: {t.source})"
        lines.append(f"- `{t.name}`{src}: {t.description} *{tool_approval_label(app.policy, t)}*")
        if t.confinement:
            lines.append(f"  ({t.confinement})")
    await app.note("\n".join(lines), markdown=True)


def tool_approval_label(policy, tool) -> str:
    """How this tool is approved now: the same rule the app applies (ApprovalPolicy)."""
    if tool.always_asks:
        return "asks every time (no sandbox)"
    if policy.needs_prompt(tool):
        return "asks first"
    if policy.guarded(tool):
        return "allowed without asking (--yes)" if policy.auto_approve else "always allowed (this session)"
    return "runs without asking (read-only)"


async def cmd_clear(app, arg):
    await app.clear_conversation()
    await app.note("new session")


async def cmd_resume(app, arg):
    if arg:
        await app.load_session(arg)
        return
    from k2mlx.tui.screens.picker import SessionPicker

    async def picked(sid):
        if sid:
            await app.load_session(sid)

    await app.push_screen(SessionPicker(app.store.list(), app.session_id), picked)


async def cmd_export(app, arg):
    if not app.session_id:
        await app.note("nothing to export yet", error=True)
        return
    path = Path(arg).expanduser() if arg else Path(f"k2mlx-{app.session_id}.md")
    if not path.is_absolute():
        path = app.workspace.root / path
    try:
        path.write_text(app.store.export_markdown(app.session_id))
    except OSError as e:
        await app.note(f"could not write {path}: {e}", error=True)
        return
    await app.note(f"exported to {path}")


async def cmd_cluster(app, arg):
    from k2mlx.tui.widgets.status import ClusterPanel

    panel = app.query_one(ClusterPanel)
    info = await app.refresh_cluster()
    if info is None:
        panel.display = False
        await app.note("not attached to a cluster (the endpoint has no /v1/cluster)")
        return
    panel.display = not panel.display if arg != "on" else True


async def cmd_quit(app, arg):
    app.exit()


HANDLERS = {"/help": cmd_help, "/model": cmd_model, "/system": cmd_system, "/temp": cmd_temp, "/tools": cmd_tools,
            "/clear": cmd_clear, "/resume": cmd_resume, "/export": cmd_export, "/cluster": cmd_cluster,
            "/quit": cmd_quit}
