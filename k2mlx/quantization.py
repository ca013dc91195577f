"""What MLX's affine quantization accepts, checked before any work (a leaf module: no MLX import,
so argparse types and the converter share it).

mlx 0.32's `mx.quantize`: "the supported bits are 1, 2, 3, 4, 5, 6 and 8", "the supported group
sizes are 32, 64, and 128". k2mlx's quantization rules (loading/formats/mlx.py) take 2..8, so
1-bit is not offered. A test probes MLX itself, so these cannot drift from it."""
from __future__ import annotations

from k2mlx.errors import ConfigError

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
FLOAT_BITS = 16  # "16 bits": keep the weights float


def bits_ok(bits: int) -> bool:
    return bits in MLX_BITS or bits == FLOAT_BITS


def check(bits: int, group_size: int, class_bits: dict | None = None) -> None:
    """ConfigError naming the bad value unless MLX can quantize with these settings."""
    for where, b in [("bits", bits), *((f"{c} bits", v) for c, v in (class_bits or {}).items())]:
        if isinstance(b, bool) or not isinstance(b, int) or not bits_ok(b):
            raise ConfigError(f"{where} must be one of {', '.join(map(str, MLX_BITS))} (MLX's quantization) "
                              f"or {FLOAT_BITS} (float), got {b!r}")
    quantized = bits < FLOAT_BITS or any(v < FLOAT_BITS for v in (class_bits or {}).values())
    if quantized and group_size not in MLX_GROUP_SIZES:
        raise ConfigError(f"group size must be one of {', '.join(map(str, MLX_GROUP_SIZES))} "
                          f"(MLX's quantization groups), got {group_size!r}")
