"""`k2mlx check --model PATH|REPO [--layers a:b]`: check a checkpoint without loading it."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH|REPO",
                        help="checkpoint folder or a Hugging Face repo id in the local cache")
    parser.add_argument("--layers", default=None, metavar="START:STOP",
                        help="check only what the stage owning these decoder layers needs (STOP exclusive)")


def run(args) -> int:
    import sys

    from k2mlx.loading.check import check

    report = check(args.model, args.layers)  # "a:b", or "a:" up to the model's last layer
    for line in report.faults:
        print(line)
    if not report.ok:
        print(f"k2mlx check: {len(report.faults)} problem(s) in {report.folder or args.model}", file=sys.stderr)
        return 1
    print(f"{report.folder}: ok")
    for line in report.info:
        print(f"  {line}")
    return 0
