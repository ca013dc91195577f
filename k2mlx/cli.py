"""The one console script: `k2mlx <command>`.

Each subcommand lives in `k2mlx/commands/<name>.py` with two functions:
`add_arguments(parser)` (argparse only, no heavy imports) and `run(args) -> int | None`.
Modules are imported only for the command being run, so `k2mlx --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

LOG_LEVELS = ["debug", "info", "warning", "error"]

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("k2mlx.commands.generate", "generate a completion for a prompt"),
    "chat": ("k2mlx.commands.chat", "terminal chat and agent (Textual)"),
    "serve": ("k2mlx.commands.serve", "OpenAI- and Anthropic-compatible HTTP endpoint"),
    "convert": ("k2mlx.commands.convert", "convert a checkpoint to a sharded MLX checkpoint"),
    "plan": ("k2mlx.commands.plan", "size a model and split its layers across hosts"),
    "download": ("k2mlx.commands.download", "download a checkpoint (optionally only some layers)"),
    "check": ("k2mlx.commands.check", "check a checkpoint's files against its config, without loading it"),
    "cluster": ("k2mlx.commands.cluster", "start, inspect and stop a multi-Mac cluster"),
    "selftest": ("k2mlx.commands.selftest", "run the backend-specific checks on this machine"),
}


MOE_PATHS = ("auto", "switch", "reference", "kernel")  # k2mlx.kernels.policy.PATHS (not imported: mlx)


def build_parser() -> argparse.ArgumentParser:
    from k2mlx import __version__

    parser = argparse.ArgumentParser(
        prog="k2mlx",
        description="Run Kimi K2 locally with MLX: chat, serve, cluster.",
    )
    parser.add_argument("--version", action="version", version=f"k2mlx {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="log verbosity of k2mlx's engine, loading, server and cluster (default warning; "
                             "failures are logged with their tracebacks)")
    parser.add_argument("--moe-path", choices=MOE_PATHS, default=None,
                        help="how MoE layers run, for every model this command loads: auto (default: "
                        "measured once per machine and shape), switch, reference, kernel; as K2MLX_MOE_PATH")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # also accepted after the command (`k2mlx generate --debug`); SUPPRESS keeps a global one
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        p.add_argument("--moe-path", choices=MOE_PATHS, default=argparse.SUPPRESS, help="as before the command")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name != module:
                raise
            p.set_defaults(_module=None)
            continue
        mod.add_arguments(p)
        if "--log-level" in p._option_string_actions:  # a command's own flag: the global default wins
            p._option_string_actions["--log-level"].default = argparse.SUPPRESS
        else:
            p.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help="as before the command")
        p.set_defaults(_module=module)
    return parser


def setup_logging(level: str) -> None:
    """k2mlx's loggers (k2mlx.*: engine, loading, server, distributed) at `level` on stderr;
    other libraries stay at warning."""
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("k2mlx").setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if args._module is None:
        parser.error(f"'{args.command}' is not available in this build")
    from k2mlx.errors import K2Error

    debug = args.debug or os.environ.get("K2MLX_DEBUG")
    if args.moe_path:  # read by k2mlx.kernels.policy at every load, here and in child ranks
        os.environ["K2MLX_MOE_PATH"] = args.moe_path
    setup_logging(args.log_level)
    try:
        rc = importlib.import_module(args._module).run(args)
        return int(rc or 0)
    except K2Error as e:
        if debug:
            raise
        print(f"k2mlx {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
