"""`k2mlx convert`: any supported checkpoint -> a sharded MLX checkpoint (streamed)."""
from __future__ import annotations

from k2mlx.commands.flags import bits, group_size, number

# flag prefix -> module class (k2mlx.loading.formats.mlx.CLASSES)
CLASS_FLAGS = {"expert": "experts", "shared": "shared", "attention": "attention", "dense": "dense",
               "embed": "embed", "head": "head"}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="source folder (bf16/float, MLX-quantized, compressed-tensors INT4 or FP8), "
                             "or a Hugging Face repo id in the local cache (`k2mlx download REPO` fetches it)")
    parser.add_argument("--out", required=True, metavar="DST", help="output folder (must not exist)")
    parser.add_argument("--bits", type=bits, default=4, help="default bits: 2-6 or 8, or 16 to keep float (default 4)")
    parser.add_argument("--group-size", type=group_size, default=64, help="32, 64 or 128 (default 64)")
    for flag, c in CLASS_FLAGS.items():
        parser.add_argument(f"--{flag}-bits", type=bits, default=None, metavar="B",
                            help=f"bits for {c} modules (16 = float; default --bits)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of float weights, scales and biases")
    parser.add_argument("--shard-size", type=number(0, above=True), default=5.0, metavar="GB",
                        help="output shard size (default 5)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from k2mlx.loading.convert import convert

    # a folder or a repo id in the local HF cache (k2mlx.loading.resolve); never a download
    class_bits = {c: getattr(args, f"{flag}_bits") for flag, c in CLASS_FLAGS.items()
                  if getattr(args, f"{flag}_bits") is not None}
    res = convert(args.model, args.out, bits=args.bits, group_size=args.group_size, class_bits=class_bits or None,
                  dtype=args.dtype, shard_bytes=max(1, int(args.shard_size * 1024**3)), force=args.force,
                  progress=not args.quiet, say=_say)
    q = res.quantization
    what = "float" if q is None else f"{q['bits']}-bit, group {q['group_size']}"
    print(f"wrote {res.out}: {res.tensors} tensors, {_size(res.bytes)} in {res.shards} shard(s), {what}")
    return 0


def _say(message: str) -> None:
    import sys

    print(f"k2mlx convert: {message}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    """GiB for real checkpoints, MiB/KiB for tiny ones (not '0.00 GiB')."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
