"""The in-process server: the engine on the default (or a given) model behind the same HTTP
interface as `k2mlx serve`, on 127.0.0.1 and a free port, run by uvicorn in a daemon thread.
The TUI then talks to it with the OpenAI client exactly as it would to a remote endpoint."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from k2mlx.errors import K2Error


def model_display_name(path) -> str:
    p = Path(path)
    return p.name or str(p)


class LocalServer:
    def __init__(self, model_path: str | os.PathLike | None = None, *, max_batch: int = 4,
                 context_length: int | None = None):
        self.model_path = model_path
        self.max_batch = max_batch
        self.context_length = context_length
        self.engine = None
        self.server = None
        self.thread: threading.Thread | None = None
        self.base_url: str | None = None
        self.model_name: str | None = None

    def start(self, status=lambda msg: None, timeout: float = 60.0) -> str:
        """Load the model, start the server, return its base URL (…/v1). Blocking: call from a thread."""
        import uvicorn

        from k2mlx import load
        from k2mlx.engine import Engine
        from k2mlx.server import create_app

        path = self.model_path
        if path is None:
            from k2mlx.loading.resolve import default_model_path

            status("preparing the default model")
            path = default_model_path()
        path = Path(path)
        self.model_name = model_display_name(path)
        status(f"loading {self.model_name}")
        model, tokenizer = load(str(path))
        self.engine = Engine(model, tokenizer, max_batch=self.max_batch, context_length=self.context_length,
                             model_name=self.model_name)
        app = create_app(self.engine)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # loopback only: this server is for this process
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="k2mlx-local-server", daemon=True)
        status("starting the local server")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise K2Error("the in-process server did not start (see `k2mlx serve` for the same model)")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    def context_limit(self) -> int | None:
        if self.engine is not None and getattr(self.engine, "context_length", None):
            return int(self.engine.context_length)
        try:
            cfg = json.loads((Path(self.model_path) / "config.json").read_text())
            cfg = cfg.get("text_config", cfg)
            return int(cfg.get("max_position_embeddings") or 0) or None
        except (OSError, ValueError, TypeError):
            return None

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self.server = self.thread = self.engine = None


def connect_local(model_path=None, status=lambda msg: None, **kw):
    """Start a LocalServer and return a Backend on it."""
    from k2mlx.tui.backend import Backend

    local = LocalServer(model_path, **kw)
    url = local.start(status)
    return Backend(url, model=local.model_name, context_limit=local.context_limit(), local=local)
