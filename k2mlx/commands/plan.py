"""`k2mlx plan`: size a model at some bits and split its layers across hosts by memory."""
from __future__ import annotations

from k2mlx.commands.flags import bits, group_size, number

# flag prefix -> module class (k2mlx.loading.formats.mlx.CLASSES)
CLASS_FLAGS = {"expert": "experts", "shared": "shared", "attention": "attention", "dense": "dense",
               "embed": "embed", "head": "head"}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="CONFIG_OR_DIR",
                        help="config.json, a model folder or a Hugging Face repo id in the local cache "
                             "(weights are not read)")
    parser.add_argument("--hosts", type=number(1, kind=int), default=None,
                        help="number of hosts (default: one per --memory)")
    parser.add_argument("--memory", default="512", metavar="GB[,GB...]",
                        help="RAM per host as Apple sells it (512 = 512 GiB), one value for all hosts "
                             "or one per host in pipeline order")
    parser.add_argument("--bits", type=bits, default=None,
                        help="quantization bits: 2-6 or 8, or 16 = bf16 (default: the checkpoint's own, else 4)")
    parser.add_argument("--group-size", type=group_size, default=None,
                        help="32, 64 or 128 (default: the checkpoint's own, else 64)")
    for flag, c in CLASS_FLAGS.items():
        parser.add_argument(f"--{flag}-bits", type=bits, default=None, metavar="B",
                            help=f"bits for {c} modules (default --bits)")
    parser.add_argument("--context", type=number(0, kind=int), default=0, metavar="TOKENS",
                        help="reserve latent KV cache for this many tokens")
    parser.add_argument("--parallel", choices=["pipeline", "tensor"], default="pipeline",
                        help="pipeline: each host a range of layers (default); tensor: each host 1/N of every "
                             "layer (embedding, head, MLA latent and router replicated)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def memories(spec: str, hosts: int | None) -> list[float]:
    from k2mlx.errors import ConfigError

    try:
        mems = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--memory must be numbers in GB separated by commas, got {spec!r}") from None
    if not mems or any(m <= 0 for m in mems):
        raise ConfigError(f"--memory must be positive GB values, got {spec!r}")
    if hosts is None:
        return mems
    if len(mems) == 1:
        return mems * hosts
    if len(mems) != hosts:
        raise ConfigError(f"--hosts {hosts} but --memory lists {len(mems)} values")
    return mems


def run(args) -> int:
    import json

    from k2mlx.config import ModelArgs, load_config_file
    from k2mlx.loading.checkpoint import folder_mla_weights
    from k2mlx.loading.plan import make_plan
    from k2mlx.loading.resolve import resolve_model

    model = resolve_model(args.model, allow_file=True)  # a folder, config.json or cached repo id
    cfg = load_config_file(model)
    margs = ModelArgs.from_dict(cfg, path=str(model))
    class_bits = {c: getattr(args, f"{flag}_bits") for flag, c in CLASS_FLAGS.items()
                  if getattr(args, f"{flag}_bits") is not None}
    own = cfg.get("quantization") or {}  # an MLX checkpoint: plan what it holds unless told otherwise
    if not own and margs.quantization_config and margs.quantization_config.get("quant_method") == "compressed-tensors":
        own = {"bits": 16, "group_size": 32}  # K2-Thinking / K2.5 INT4: experts 4-bit, the rest bf16
        class_bits.setdefault("experts", 4)
    bits = args.bits if args.bits is not None else int(own.get("bits", 4))
    group_size = args.group_size if args.group_size is not None else int(own.get("group_size", 64))
    # the checkpoint's per-module entries count too, unless other bits were asked for
    paths = {k: v for k, v in own.items() if isinstance(v, (dict, bool))} \
        if args.bits is None and not class_bits else None
    mems = memories(args.memory, args.hosts)
    plan = make_plan(margs, mems, bits, group_size, args.context,
                     class_bits or None, paths, folder_mla_weights(model, margs))
    if getattr(args, "parallel", "pipeline") == "tensor":
        from k2mlx.distributed.tensor_plan import tensor_plan

        plan = tensor_plan(plan, margs, mems, bits, group_size, args.context, class_bits or None, paths,
                           folder_mla_weights(model, margs))
    if args.json:
        print(json.dumps(plan))
        return 0
    _print(plan)
    return 0 if plan["fits"] else 2


def _gb(b: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b} B"


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return str(n)


def _print(p: dict) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    con = Console()
    bits = "bf16" if p["bits"] >= 16 else f"{p['bits']}-bit (group {p['group_size']})"
    extra = ", ".join(f"{k} {v}-bit" for k, v in p["class_bits"].items())
    con.print(f"[bold]{p['model_type']}[/]: {_count(p['total_params'])} parameters, "
              f"{_count(p['active_params'])} active per token; {bits}{' (' + extra + ')' if extra else ''}")
    con.print(f"weights {_gb(p['weight_bytes'])} (embedding {_gb(p['embed_bytes'])}, norm+head "
              f"{_gb(p['head_bytes'])}, layers {_gb(sum(p['layer_bytes']))})")
    con.print(f"latent KV {p['kv_bytes_per_token']:,} bytes/token, {_gb(p['kv_bytes'])} at {p['context']:,} tokens")
    # no box and unwrapped cells: the table fits 80 columns instead of breaking "358.5 GiB" in two
    t = Table(*(Column(c, no_wrap=True) for c in ("host", "memory", "layers", "weights", "KV cache", "total",
                                                  "usable", "fits")), box=None, pad_edge=False, header_style="bold underline")
    if p.get("parallel") == "tensor":
        con.print(f"tensor parallel: every host holds {p['hosts'][0]['share']} of every layer; embedding, head, "
                  "MLA latent projections, router and the latent KV cache are replicated")
    for h in p["hosts"]:
        t.add_row(str(h["host"]), f"{h['memory_gb']:g} GB", f"{h['layers'][0]}..{h['layers'][1]} ("
                  f"{h.get('share', h['num_layers'])})",
                  _gb(h["weight_bytes"]), _gb(h["kv_bytes"]), _gb(h["bytes"]), _gb(h["usable_bytes"]),
                  "[green]yes[/]" if h["fits"] else "[red]NO[/]")
    con.print(t)
    if p["fits"]:
        con.print("[green]fits with headroom.[/]")
    else:
        short = [(h, max(0, h["bytes"] - h["usable_bytes"])) for h in p["hosts"] if not h["fits"]]
        each = "; ".join(f"host {h['host']} needs {_gb(n)} more" for h, n in short)
        con.print(f"[red]does not fit[/]: {_gb(sum(n for _, n in short))} short in all ({each}); "
                  "use fewer bits, more hosts or a shorter context.")
    # the usable column assumes this limit; raising it never makes a plan that is short fit
    if p["fits"]:
        con.print("On macOS let the GPU wire that much memory (per host, until reboot):")
    else:  # no setup advice for a plan that cannot run: only what "usable" assumed
        con.print("usable assumes the largest GPU wired limit that leaves macOS its reserve:")
    for h in p["hosts"]:
        if h["wired_limit_mb"] > 0:
            con.print(f"  host {h['host']}: " + ("sudo sysctl " if p["fits"] else "")
                      + f"iogpu.wired_limit_mb={h['wired_limit_mb']}")
        else:
            con.print(f"  host {h['host']}: {h['memory_gb']:g} GB is all kept for macOS: nothing can be wired")
