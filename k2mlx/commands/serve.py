"""`k2mlx serve`: the OpenAI- and Anthropic-compatible endpoint."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: the embedded k2-nano model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key-file", metavar="PATH", default=None,
                        help="require the key in this file (first line) as 'Authorization: Bearer KEY'; a key is "
                        "required to bind a non-loopback address. The key can also come from the environment "
                        "variable K2MLX_API_KEY. Both keep it out of `ps`, unlike --api-key")
    parser.add_argument("--api-key", default=None, help="the key itself (visible to every user in `ps`: prefer "
                        "K2MLX_API_KEY or --api-key-file)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. https://chat.example; '*' for any) call the server; "
                        "repeatable. Pages on localhost are allowed; any other Origin is refused, and without an "
                        "API key so is any Host name but localhost, 127.0.0.1 and ::1 (DNS rebinding)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="open HTTP connections at most; at the limit the longest-idle one is closed (default 512)")
    parser.add_argument("--read-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="a client must send a request's headers, and then its body, within this many seconds "
                        "each (default 20)")
    parser.add_argument("--write-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="drop a client that reads nothing of its reply for this long; its request is "
                        "cancelled (default 60)")
    from k2mlx.commands.flags import number

    parser.add_argument("--max-batch", type=number(1, kind=int), default=8,
                        help="sequences decoded together (default 8)")
    parser.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: folder name)")
    parser.add_argument("--cache-gb", type=number(0), default=2.0,
                        help="prefix cache size in GB (default 2; 0 disables)")
    parser.add_argument("--prompt-cache-dir", metavar="DIR", default=None,
                        help="keep prompt prefixes' KV caches on disk here, so a restart does not prefill a long "
                        "system prompt again (default ~/.cache/k2mlx/prompt-cache; about 70 KB per token for K2)")
    parser.add_argument("--prompt-cache-gb", type=float, default=20.0,
                        help="disk budget of the prompt cache in GB, least recently used evicted (default 20; "
                        "0 turns the disk cache off)")
    parser.add_argument("--no-prompt-cache", action="store_true", help="no prompt cache on disk")
    parser.add_argument("--default-max-tokens", type=number(1, kind=int), default=2048,
                        help="completion limit when a request sets none (default 2048)")
    parser.add_argument("--hosts", help="run as a pipeline over these hosts: a comma list (rank order) or a "
                        "cluster file; see `k2mlx cluster`")
    from k2mlx.distributed.cli import add_parallel_argument

    add_parallel_argument(parser)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="server log verbosity (default warning)")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model, in one line, when the address cannot be bound (uvicorn
    would only say so after the banner, with exit code 3)."""
    import socket

    from k2mlx.errors import RequestError

    addr = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((addr, port))
        except OSError as e:
            import errno

            hint = ("; is another server running there? Pick another port with --port"
                    if e.errno == errno.EADDRINUSE else "")
            raise RequestError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}", param="port") from None


def resolve_api_key(args) -> str | None:
    """--api-key-file, then K2MLX_API_KEY, then --api-key (which `ps` shows)."""
    import os
    import sys

    from k2mlx.errors import RequestError

    path = getattr(args, "api_key_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}",
                               param="api_key_file") from None
        if not key:
            raise RequestError(f"--api-key-file {path} is empty", param="api_key_file")
        return key
    if os.environ.get("K2MLX_API_KEY"):
        return os.environ["K2MLX_API_KEY"].strip() or None
    if getattr(args, "api_key", None):
        print("k2mlx serve: warning: --api-key shows in `ps` to every user of this machine; "
              "use K2MLX_API_KEY or --api-key-file", file=sys.stderr)
        return args.api_key
    return None


def open_disk_cache(args, model, path):
    """The persistent prompt cache for this model, or None (turned off). On a cluster (`--hosts`)
    each rank keeps its own part: its layers on a pipeline, whole blocks under tensor parallelism
    (distributed/disk_pipeline.py)."""
    import math

    from k2mlx.errors import RequestError

    gb = getattr(args, "prompt_cache_gb", 0.0)
    if not math.isfinite(gb) or gb < 0:
        raise RequestError(f"--prompt-cache-gb must be 0 or more, got {gb}", param="prompt_cache_gb")
    if getattr(args, "no_prompt_cache", False) or gb == 0:
        return None
    from k2mlx.engine.disk_cache import open_prompt_cache

    block = getattr(args, "prompt_cache_block", 256)  # no flag: tests use small blocks
    try:
        if getattr(model, "link", None) is not None:  # a cluster's rank 0 (pipeline or tensor)
            from k2mlx.distributed.disk_pipeline import open_for_cluster

            return open_for_cluster(model, path, args.prompt_cache_dir, gb, block=block)
        return open_prompt_cache(model, path, args.prompt_cache_dir, max_gb=gb, block=block)
    except OSError as e:
        raise RequestError(f"cannot use --prompt-cache-dir {args.prompt_cache_dir or '(default)'}: "
                           f"{e.strerror or e}", param="prompt_cache_dir") from None


def run(args) -> int:
    import os
    import sys
    from pathlib import Path

    from k2mlx.errors import RequestError

    if getattr(args, "api_key_file", None):  # read here: the file need not exist on a cluster's rank 0
        args.api_key, args.api_key_file = resolve_api_key(args), None
        api_key = args.api_key
    else:
        api_key = resolve_api_key(args)
    if getattr(args, "hosts", None):  # pipeline over several hosts (k2mlx.distributed)
        from k2mlx.distributed.cli import run_on_cluster

        return run_on_cluster(args, "serve")
    if not is_loopback(args.host) and not api_key:
        raise RequestError(
            f"refusing to bind {args.host} without an API key: anyone who can reach this machine could use the model. "
            "Pass --api-key KEY (clients then send 'Authorization: Bearer KEY'), or bind 127.0.0.1.", param="host")
    if not 0 < args.port < 65536:
        raise RequestError(f"--port must be 1..65535, got {args.port}", param="port")
    if args.max_batch < 1:
        raise RequestError("--max-batch must be at least 1", param="max_batch")
    max_conn, read_timeout = getattr(args, "max_connections", 512), getattr(args, "read_timeout", 20.0)
    if not 1 <= max_conn <= 1 << 20:
        raise RequestError(f"--max-connections must be at least 1, got {max_conn}", param="max_connections")
    write_timeout = getattr(args, "write_timeout", 60.0)
    for flag, v in (("read_timeout", read_timeout), ("write_timeout", write_timeout)):
        if not 0 < v <= 3600:
            raise RequestError(f"--{flag.replace('_', '-')} must be between 0 and 3600 seconds, got {v}", param=flag)
    from k2mlx.server.guard import normalize_origin

    origins = []
    for o in getattr(args, "allow_origin", None) or ():
        try:
            origins.append(normalize_origin(o))
        except ValueError as e:
            raise RequestError(f"--allow-origin: {e}", param="allow_origin") from None
    check_port_free(args.host, args.port)

    path = args.model
    if path is None:
        from k2mlx.loading.resolve import default_model_path

        path = str(default_model_path())
    from k2mlx import load
    from k2mlx.engine import Engine
    from k2mlx.server import create_app

    standalone = getattr(args, "preloaded", None) is None  # see commands/generate.py
    model, tokenizer = getattr(args, "preloaded", None) or load(path)
    name = args.model_name or Path(path).resolve().name
    engine = Engine(model, tokenizer, max_batch=args.max_batch, cache_bytes=int(args.cache_gb * (1 << 30)),
                    default_max_tokens=args.default_max_tokens, model_name=name,
                    prompt_cache=open_disk_cache(args, model, path))
    if getattr(args, "on_engine", None):  # cluster: fail requests with 503 on rank loss
        args.on_engine(engine)
    app = create_app(engine, model_name=name, api_key=api_key, allow_origins=tuple(origins))
    print(f"k2mlx serve: {name} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, "
          f"context {engine.context_length})", file=sys.stderr, flush=True)
    try:
        from k2mlx.server.http import Limits, serve

        serve(app, args.host, args.port, Limits(header_timeout=read_timeout, body_timeout=read_timeout,
                                                keep_alive=min(5.0, read_timeout), write_timeout=write_timeout,
                                                max_connections=max_conn),
              log_level=args.log_level)
    finally:
        engine.close()
    if standalone:
        # skip interpreter teardown (a fast exit; the engine's threads have fully ended in close(),
        # see k2mlx/engine/threads.py); everything is flushed and closed by now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
