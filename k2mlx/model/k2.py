"""The K2 decoder (DeepSeek-V3 layout) and `Model`, which may hold only a range of layers
(a pipeline stage). Parameter keys are the Hugging Face names with absolute layer indices:
a stage owning layers 30..60 has `model.layers.30.*` .. `model.layers.60.*`, the first stage
`model.embed_tokens`, the last stage `model.norm` and `lm_head`.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from k2mlx.mlxlm_adapter import KVCache, create_attention_mask

from k2mlx.config import ModelArgs
from k2mlx.model.mla import MLAttention
from k2mlx.model.moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, mla_weights: str = "kv_b"):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLAttention(args, mla_weights)
        self.mlp = MoE(args) if args.is_moe_layer(layer_idx) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class K2Body(nn.Module):
    """Holds the `model.*` parameters; unowned layers are None placeholders so that owned
    ones keep their absolute index in parameter names."""

    def __init__(self, args: ModelArgs, layer_range: range, mla_weights: str = "kv_b"):
        super().__init__()
        n = args.num_hidden_layers
        if layer_range.start == 0:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [None] * layer_range.start + [DecoderLayer(args, i, mla_weights) for i in layer_range]
        if layer_range.stop == n:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs, layers: range | None = None, mla_weights: str = "kv_b"):
        """mla_weights: how the checkpoint stores MLA's up-projection, "kv_b" (kv_b_proj, the
        Hugging Face layout) or "split" (mlx-lm's embed_q / unembed_out); see model/mla.py."""
        super().__init__()
        n = args.num_hidden_layers
        if layers is None:
            layers = range(n)
        if not isinstance(layers, range) or layers.step != 1:
            layers = range(min(layers), max(layers) + 1)
        if not (0 <= layers.start < layers.stop <= n):
            raise ValueError(f"layer range {layers.start}..{layers.stop - 1} is outside 0..{n - 1}")
        self.args = args
        self.model_type = args.model_type
        self._layer_range = layers
        self.mla_weights = mla_weights
        self.model = K2Body(args, layers, mla_weights)
        if self.is_last:
            if args.tie_word_embeddings:
                if not self.is_first:
                    # the head reuses the embedding matrix: the last stage needs it too
                    self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
            else:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    # ---- stage description ----

    @property
    def layer_range(self) -> range:
        return self._layer_range

    @property
    def is_first(self) -> bool:
        return self._layer_range.start == 0

    @property
    def is_last(self) -> bool:
        return self._layer_range.stop == self.args.num_hidden_layers

    @property
    def layers(self) -> list:
        """The owned decoder layers (mlx-lm convention: used for make_cache and quantization)."""
        return self.model.layers[self._layer_range.start:]

    # ---- forward pieces ----

    def embed(self, tokens: mx.array) -> mx.array:
        if "embed_tokens" not in self.model or not self.is_first:
            raise RuntimeError("embed() is only available on the first pipeline stage")
        return self.model.embed_tokens(tokens)  # [B, L, hidden]

    def forward_layers(self, h: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        if cache is None:
            cache = [None] * len(self.layers)
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.layers)} layers")
        if mask is None:
            mask = create_attention_mask(h, cache[0], return_array=True)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return h

    def head(self, h: mx.array) -> mx.array:
        if not self.is_last:
            raise RuntimeError("head() is only available on the last pipeline stage")
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)  # [B, L, vocab]

    def __call__(self, tokens: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        if not (self.is_first and self.is_last):
            raise RuntimeError(
                f"this Model holds layers {self._layer_range.start}..{self._layer_range.stop - 1} "
                "only; use embed / forward_layers / head"
            )
        return self.head(self.forward_layers(self.embed(tokens), cache, mask))

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]

    def set_attention_form(self, form: str) -> None:
        """'auto' (default), 'absorbed' or 'expanded' for every owned layer."""
        if form not in ("auto", "absorbed", "expanded"):
            raise ValueError(f"unknown attention form {form!r}")
        for layer in self.layers:
            layer.self_attn.attention_form = form

    @property
    def cast_predicate(self):
        # keep the router's correction bias in float32 (selection is sensitive to it)
        return lambda k: "e_score_correction_bias" not in k
