"""Multi-head Latent Attention (MLA) with a latent KV cache.

Per token and layer the cache holds only the normalized KV latent (kv_lora_rank values, cache
"keys" [B, 1, T, r]) and the roped shared key part (qk_rope_head_dim values, cache "values"
[B, 1, T, rope]) in an mlx-lm `KVCache` / `BatchKVCache`.

Two equivalent ways to attend over that cache:
- expanded (prefill): kv_b_proj turns the latent of every cached token into per-head keys and
  values, then ordinary attention with head dim qk_nope + qk_rope;
- absorbed (decode): the key half of kv_b_proj is folded into the query (q_nope -> latent space)
  and the value half is applied after attention, so attention runs over the latent itself and
  nothing per-token is expanded. Its per-step cost is independent of the expanded K/V size.

The absorbed matrices are kv_b_proj's own halves ([H * (nope + v), r] seen as
[H, nope + v, r], split after nope), copied once into contiguous arrays: no sanitize step and no
re-quantization, so a quantized kv_b_proj works as is: affine groups run along r, which is the
axis `quantized_matmul` groups for both `x @ W_k` (transpose=False) and `x @ W_v^T`
(transpose=True). (mlx-lm instead dequantizes kv_b and re-quantizes W_k^T along nope, which
adds a second rounding.)

Checkpoints written by a current mlx-lm store those two halves already split per head:
`self_attn.embed_q` [H, r, nope] (the key half transposed, grouped along nope when quantized)
and `self_attn.unembed_out` [H, v, r] (the value half, grouped along r). With
`weights="split"` the module holds them as `PerHeadLinear`s and runs on the stored matrices as
they are (never dequantized and re-quantized); absorbed attention is exactly that form, and
the expanded form gets per-head keys and values from the same two matrices.
"""
from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from k2mlx.mlxlm_adapter import create_causal_mask

from k2mlx.config import ModelArgs
from k2mlx.model.rope import YarnRoPE, softmax_scale


@functools.cache
def _has_qmm_no_transpose() -> bool:
    """Whether quantized_matmul(transpose=False) runs on the default device (Metal and CPU
    do; MLX 0.32's CUDA backend does not for decode shapes)."""
    cuda = getattr(mx, "cuda", None)
    on_cuda = cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu
    return not on_cuda


# the two ways a checkpoint stores MLA's up-projection (see the module docstring)
MLA_WEIGHTS = ("kv_b", "split")


class PerHeadLinear(nn.Module):
    """One matrix per head, weight [H, out, in]: `x @ W^T` (transpose) or `x @ W`, batched over
    the head axis (x [..., H or 1, L, in or out]). mlx-lm's `embed_q` / `unembed_out` layout."""

    def __init__(self, num_heads: int, output_dims: int, input_dims: int):
        super().__init__()
        scale = (1.0 / input_dims) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (num_heads, output_dims, input_dims))

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return x @ (self.weight.swapaxes(-1, -2) if transpose else self.weight)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedPerHeadLinear(self.weight, group_size, bits, mode)


class QuantizedPerHeadLinear(nn.Module):
    """`PerHeadLinear` with MLX-quantized weights (groups along the last axis, `in`)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        # lazy: the loader replaces these with the checkpoint's own codes before evaluation
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        if not transpose and not _has_qmm_no_transpose():
            # no transpose=False quantized matmul on MLX's CUDA backend: dequantize (exact)
            w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size,
                              bits=self.bits, mode=self.mode)
            return x @ w.astype(x.dtype)
        return mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=transpose,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, weights: str = "kv_b"):
        """weights: "kv_b" (one kv_b_proj linear, the Hugging Face layout) or "split"
        (mlx-lm's per-head embed_q / unembed_out)."""
        super().__init__()
        self.num_heads = H = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.q_head_dim = args.qk_head_dim
        hidden, bias = args.hidden_size, args.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        if weights not in MLA_WEIGHTS:
            raise ValueError(f"unknown MLA weight layout {weights!r}")
        self.weights_layout = weights
        if weights == "kv_b":
            self.kv_b_proj = nn.Linear(
                self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False
            )
        else:
            self.embed_q = PerHeadLinear(H, self.kv_lora_rank, self.qk_nope_head_dim)  # [H, r, nope]
            self.unembed_out = PerHeadLinear(H, self.v_head_dim, self.kv_lora_rank)  # [H, v, r]
        self.o_proj = nn.Linear(H * self.v_head_dim, hidden, bias=bias)

        self.rope = YarnRoPE(
            self.qk_rope_head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings
        )
        self.scale = softmax_scale(self.q_head_dim, args.rope_scaling)
        # "auto" picks by cost; tests force "absorbed" / "expanded" to compare the two.
        self.attention_form = "auto"

    # ---- projections through kv_b_proj's halves (quantized or not) ----

    def _halves(self):
        """kv_b_proj split per head into its key half [H, nope, cols] and value half
        [H, v, cols] (weight, scales, biases), as contiguous arrays built once and reused.

        Contiguous copies rather than strided views: backends handle batched quantized
        matmuls only on contiguous batches (CUDA refuses strided ones, Metal would copy per
        call). The copy is exact (no re-quantization) and costs kv_b's size once (K2: ~0.05%
        of the weights). Rebuilt whenever kv_b_proj's weight array is replaced (reload)."""
        m = self.kv_b_proj
        cached = self.__dict__.get("_kv_b_halves")
        if cached is not None and cached[0] is m.weight:
            return cached[1]
        H, n = self.num_heads, self.qk_nope_head_dim
        quant = m if isinstance(m, nn.QuantizedLinear) else None
        arrays = [m.weight] + ([m.scales, m.get("biases")] if quant else [])
        per_head = [None if a is None else a.reshape(H, -1, a.shape[-1]) for a in arrays]
        k = [None if a is None else mx.contiguous(a[:, :n]) for a in per_head]
        v = [None if a is None else mx.contiguous(a[:, n:]) for a in per_head]
        mx.eval([a for a in k + v if a is not None])
        halves = (k, v, quant)
        # a plain attribute (not a Module entry): never a parameter, never saved or loaded
        object.__setattr__(self, "_kv_b_halves", (m.weight, halves))
        return halves

    def _through_k(self, x: mx.array) -> mx.array:
        """x [B, H, L, nope] @ W_k [H, nope, r] -> [B, H, L, r]: queries into latent space."""
        if self.weights_layout == "split":
            return self.embed_q(x)  # embed_q is W_k^T: x @ embed_q^T
        k, _, q = self._halves()
        if q is None:
            return x @ k[0]
        w, s, b = k
        if not _has_qmm_no_transpose():
            # MLX's CUDA backend has no transpose=False quantized matmul: dequantize the key
            # half (H * nope * r values) instead; still exact, no re-quantization.
            wk = mx.dequantize(w, s, b, group_size=q.group_size, bits=q.bits, mode=q.mode)
            return x @ wk.astype(x.dtype)
        return mx.quantized_matmul(
            x, w, s, b, transpose=False, group_size=q.group_size, bits=q.bits, mode=q.mode
        )

    def _through_v(self, x: mx.array) -> mx.array:
        """x [B, H, L, r] @ W_v^T, W_v [H, v, r] -> [B, H, L, v]: latent output to values."""
        if self.weights_layout == "split":
            return self.unembed_out(x)  # unembed_out is W_v itself
        _, v, q = self._halves()
        if q is None:
            return x @ v[0].swapaxes(-1, -2)
        w, s, b = v
        return mx.quantized_matmul(
            x, w, s, b, transpose=True, group_size=q.group_size, bits=q.bits, mode=q.mode
        )

    def use_absorbed(self, L: int, T: int) -> bool:
        if self.attention_form != "auto":
            return self.attention_form == "absorbed"
        r, n, v, p = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim, self.qk_rope_head_dim
        # multiply-adds per head: expanding T cached tokens + attention at head dim n+p / v,
        # against projecting L queries/outputs + attention at head dim r+p / r
        expanded = T * (n + v) * r + L * T * (n + p + v)
        absorbed = L * (n + v) * r + L * T * (2 * r + p)
        return absorbed < expanded

    # ---- forward ----

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        H = self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, H, self.q_head_dim).transpose(0, 2, 1, 3)  # [B, H, L, nope+rope]
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)

        ckv = self.kv_a_proj_with_mqa(x)  # [B, L, r + rope]
        latent, k_pe = mx.split(ckv, [self.kv_lora_rank], axis=-1)
        latent = mx.expand_dims(self.kv_a_layernorm(latent), 1)  # [B, 1, L, r]
        k_pe = mx.expand_dims(k_pe, 1)  # [B, 1, L, rope]

        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)  # [B, 1, T, r], [B, 1, T, rope]
        T = latent.shape[2]

        if self.use_absorbed(L, T):
            out = self._attend_absorbed(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self._attend_expanded(q_nope, q_pe, latent, k_pe, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, H * self.v_head_dim)
        return self.o_proj(out)

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, mask):
        B, H, L, _ = q_nope.shape
        T = latent.shape[2]
        if self.weights_layout == "split":
            k_nope = self.embed_q(latent, transpose=False)  # [B, 1, T, r] @ [H, r, nope]
            values = self.unembed_out(latent)  # [B, H, T, v]
        else:
            kv = self.kv_b_proj(latent[:, 0])  # [B, T, H * (nope + v)]
            kv = kv.reshape(B, T, H, -1).transpose(0, 2, 1, 3)  # [B, H, T, nope + v]
            k_nope, values = mx.split(kv, [self.qk_nope_head_dim], axis=-1)
        k_pe = mx.broadcast_to(k_pe, (B, H, T, self.qk_rope_head_dim))
        keys = mx.concatenate([k_nope, k_pe], axis=-1)  # [B, H, T, nope + rope]
        queries = mx.concatenate([q_nope, q_pe], axis=-1)  # [B, H, L, nope + rope]
        if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
            mask = mask.astype(queries.dtype)
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=self.scale, mask=mask
        )  # [B, H, L, v]

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        L, T = q_nope.shape[2], latent.shape[2]
        q_lat = self._through_k(q_nope)  # [B, H, L, r]
        # The rope part of the scores rides along as an additive mask, so attention itself
        # runs with keys == values == the cached latent (nothing concatenated per step).
        pe = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)  # [B, H, L, T]
        if isinstance(mask, str):
            mask = create_causal_mask(L, offset=T - L) if L > 1 else None
        if mask is not None:
            if mask.dtype == mx.bool_:
                pe = mx.where(mask, pe, mx.array(mx.finfo(pe.dtype).min, pe.dtype))
            else:
                pe = pe + mask.astype(pe.dtype)
        out = mx.fast.scaled_dot_product_attention(
            q_lat, latent, latent, scale=self.scale, mask=pe
        )  # [B, H, L, r]
        return self._through_v(out)  # [B, H, L, v]
