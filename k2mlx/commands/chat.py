"""`k2mlx chat`: the terminal chat and agent (Textual app in k2mlx.tui).

No arguments: the default local model runs in this process behind the same OpenAI-style
interface as `k2mlx serve`, so a fresh install chats at once."""
from __future__ import annotations

import argparse
import functools
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="checkpoint folder to run in-process (default: the embedded model)")
    src.add_argument("--endpoint", metavar="URL",
                     help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (`k2mlx serve`, a cluster)")
    src.add_argument("--hosts", metavar="H1,H2",
                     help="attach to the cluster on these hosts (its endpoint on the first host, --port)")
    parser.add_argument("--port", type=int, default=8000, help="cluster endpoint port with --hosts (default 8000)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("K2MLX_API_KEY"),
                        help="bearer token for --endpoint (env K2MLX_API_KEY)")
    parser.add_argument("--model-name", metavar="NAME", help="model id to request from the endpoint")
    parser.add_argument("--workspace", metavar="DIR", default=".",
                        help="folder the agent's file tools are confined to and the only place run_shell's "
                             "sandbox lets commands write (default: current folder)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="ID",
                        help="resume the latest session, or the session ID")
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    from k2mlx.commands.flags import number

    parser.add_argument("--temp", type=number(0, 2), default=0.6, help="sampling temperature, 0..2 (default 0.6)")
    parser.add_argument("--max-tokens", type=number(1, kind=int), default=None, help="cap on each reply's length")
    parser.add_argument("--mcp-config", metavar="FILE",
                        help="MCP servers file (default ~/.config/k2mlx/mcp.json: {\"mcpServers\": {...}})")
    parser.add_argument("--sessions-db", metavar="FILE", help="SQLite file for sessions "
                        "(default ~/.local/share/k2mlx/sessions.db, env K2MLX_SESSIONS_DB)")
    approve = parser.add_mutually_exclusive_group()
    approve.add_argument("--yes", action="store_true",
                         help="run tools that write or execute without asking (use with care; run_shell "
                              "without an OS sandbox still asks every time)")
    approve.add_argument("--ask-all", action="store_true",
                         help="ask before every tool call, read-only ones (read_file, list_dir, ...) too")


def run(args) -> int:
    from k2mlx.errors import ConfigError, K2Error

    if args.temp is not None and not 0.0 <= args.temp <= 2.0:
        raise ConfigError(f"--temp must be between 0 and 2, got {args.temp}", key="--temp")
    workspace = os.path.abspath(os.path.expanduser(args.workspace))
    if not os.path.isdir(workspace):
        raise ConfigError(f"--workspace {workspace} is not a folder", key="--workspace")

    from k2mlx.tui.app import ChatApp
    from k2mlx.tui.backend import Backend
    from k2mlx.tui.mcp import load_config
    from k2mlx.tui.sessions import SessionStore

    mcp_servers = load_config(args.mcp_config)
    backend = None
    connect = None  # a callable that starts the in-process server, when there is no endpoint
    if args.endpoint:
        backend = Backend(args.endpoint, api_key=args.api_key, model=args.model_name)
    elif args.hosts:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if not hosts:
            raise ConfigError("--hosts needs at least one host name", key="--hosts")
        # rank 0 (the first host) serves the cluster's endpoint; `k2mlx cluster up` starts it
        first = hosts[0].split("@")[-1]
        backend = Backend(f"http://{first}:{args.port}/v1", api_key=args.api_key, model=args.model_name)
    else:
        if args.model is not None:  # a wrong path fails here in one line, not inside the opened app
            from k2mlx.loading import preflight

            preflight(args.model)  # folder or cached repo id, config, tokenizer
        from k2mlx.tui.local import connect_local

        connect = functools.partial(connect_local, args.model)  # called with a progress callback

    store = SessionStore(args.sessions_db)
    app = ChatApp(backend=backend, connect=connect, store=store, workspace=workspace, mcp_servers=mcp_servers,
                  resume=args.resume, temperature=args.temp, system=args.system, max_tokens=args.max_tokens,
                  auto_approve=args.yes, ask_all=args.ask_all)
    try:
        app.run()
    finally:
        if app.backend is not None and app.backend.local is not None:
            app.backend.local.stop()
        store.close()
    if app.return_code not in (None, 0):
        raise K2Error("the chat app stopped on an error (rerun with --debug for the traceback)")
    return 0
