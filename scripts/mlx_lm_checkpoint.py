#!/usr/bin/env python
"""Write a K2 checkpoint the way a current mlx-lm writes one, by running mlx-lm's own code.

mlx-lm's model (`mlx_lm.models.deepseek_v3`, or `kimi_k25` for the nested form) is built from a
K2 config, every parameter randomized (non-zero norms and router correction biases included),
optionally quantized with mlx-lm's `quantize_model` (per-module overrides through its
quant_predicate) and saved with mlx-lm's `save_model` / `save_config`. So the folder holds what
mlx-community uploads hold: MLA as `self_attn.embed_q` / `unembed_out`, experts stacked under
`mlp.switch_mlp`, and for kimi_k25 everything under `language_model.`. Tests and
scripts/bench_model.py use it; nothing here is k2mlx code.

    python scripts/mlx_lm_checkpoint.py OUT [--form kimi_k25] [--bits 4] [--group-size 32]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def tiny_k2_config(**overrides) -> dict:
    """A small K2 text config (kimi_k2 form): one dense layer, then MoE; n_group 1 as in K2."""
    cfg = dict(
        model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], vocab_size=320, hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        routed_scaling_factor=2.827, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=32, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=50000.0,
        rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=16, beta_fast=1.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        attention_bias=False, tie_word_embeddings=False, num_nextn_predict_layers=0, bos_token_id=0,
        eos_token_id=1,
    )
    cfg.update(overrides)
    return cfg


def nest_k25(text: dict) -> dict:
    """The kimi_k25 form of a text config: the text model under `text_config`."""
    return {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
            "text_config": dict(text), "tie_word_embeddings": False}


def _randomize(model, seed: int, dtype) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    params = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            w = 1.0 + 0.2 * mx.random.normal(v.shape)
        elif k.endswith("e_score_correction_bias"):
            w = 0.05 * mx.random.normal(v.shape)
        else:
            w = mx.random.normal(v.shape) / math.sqrt(v.shape[-1])
        params.append((k, w.astype(mx.float32 if k.endswith("e_score_correction_bias") else dtype)))
    model.load_weights(params)
    mx.eval(model.parameters())


def write_mlx_lm_checkpoint(folder, config: dict, bits: int | None = None, group_size: int = 64,
                            overrides: dict | None = None, seed: int = 0, dtype: str = "float32",
                            vision_tensor: bool = False) -> Path:
    """Build mlx-lm's model for `config`, randomize, quantize (bits) and save into `folder`.

    overrides: {module path suffix: {"bits", "group_size"} | False}, handed to mlx-lm's
    quantize_model as its quant_predicate (mlx-lm records them per module in config.json).
    vision_tensor: add a `vision_tower.*` tensor (kimi_k25 uploads hold one; loaders drop it)."""
    import importlib

    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save_config, save_model

    folder = Path(folder)
    config = json.loads(json.dumps(config))
    # mlx-lm runs kimi_k2 configs on its deepseek_v3 module (its MODEL_REMAPPING)
    module = {"kimi_k2": "deepseek_v3"}.get(config["model_type"], config["model_type"])
    arch = importlib.import_module(f"mlx_lm.models.{module}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    _randomize(model, seed, getattr(mx, dtype))
    if bits is not None:
        def predicate(path, module):
            for suffix, params in (overrides or {}).items():
                if path.endswith(suffix):
                    return params
            return True

        model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    save_model(folder, model)
    if vision_tensor:
        name = "model-vision.safetensors"
        mx.save_safetensors(str(folder / name), {"vision_tower.patch_embed.proj.weight": mx.ones((4, 3))},
                            metadata={"format": "mlx"})
        index_file = folder / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        index["weight_map"]["vision_tower.patch_embed.proj.weight"] = name
        index_file.write_text(json.dumps(index, indent=4))
    save_config(config, folder / "config.json")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--form", choices=("kimi_k2", "kimi_k25"), default="kimi_k2")
    ap.add_argument("--bits", type=int, default=None, help="quantize with mlx-lm (default: float)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--config", default=None, help="a JSON file of K2 text-config keys to override")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    text = tiny_k2_config(**(json.loads(Path(a.config).read_text()) if a.config else {}))
    cfg = nest_k25(text) if a.form == "kimi_k25" else text
    write_mlx_lm_checkpoint(a.out, cfg, a.bits, a.group_size, seed=a.seed, dtype=a.dtype,
                            vision_tensor=a.form == "kimi_k25")
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
