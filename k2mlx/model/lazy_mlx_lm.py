"""Old import path of the lazy mask and cache helpers: they live in `k2mlx.mlxlm_adapter` (the
one module that touches mlx-lm). Kept until every caller imports the adapter."""
from k2mlx.mlxlm_adapter import KVCache, create_attention_mask, create_causal_mask  # noqa: F401
