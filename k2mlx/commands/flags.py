"""argparse types for numeric flags: a bad value is refused by argparse naming the flag
(`argument --temp: must be between 0 and 2, got -1`), before anything loads.

No heavy imports here: every command's add_arguments uses these while `k2mlx --help` builds.
"""
from __future__ import annotations

import argparse
import math

from k2mlx.quantization import FLOAT_BITS, MLX_BITS, MLX_GROUP_SIZES, bits_ok


def number(lo: float | None = None, hi: float | None = None, kind=float, above: bool = False):
    """A type accepting `kind` values in [lo, hi] (lo excluded with `above`)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and (v <= lo if above else v < lo):
            if hi is not None:
                raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, got {text}")
            raise argparse.ArgumentTypeError(f"must be {'above' if above else 'at least'} {lo:g}, got {text}")
        if hi is not None and v > hi:
            if lo is not None:
                raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, got {text}")
            raise argparse.ArgumentTypeError(f"must be at most {hi:g}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def bits(text: str) -> int:
    """Quantization bits MLX supports, or 16 for float."""
    v = number(kind=int)(text)
    if not bits_ok(v):
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, MLX_BITS))} (MLX's quantization) "
                                         f"or {FLOAT_BITS} (float), got {text}")
    return v


def group_size(text: str) -> int:
    v = number(kind=int)(text)
    if v not in MLX_GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, MLX_GROUP_SIZES))} "
                                         f"(MLX's quantization groups), got {text}")
    return v
