"""K2.6 and K2.7-Code configs plan and load.

RECONSTRUCTIONS, not copies of the released files (nothing is downloaded here): built from the
facts in /work/shared/k2-reference.md -- the K2 layout (61 layers, 64 heads, 384 experts of
2048, DeepSeek-V3 MLA), native INT4 as compressed-tensors pack-quantized with group size 32
(routed experts only), about 595 GB, and some releases nesting the text model under
`text_config` (model_type kimi_k25, with a vision config beside it). Here K2.6 takes the nested
form with its quantization_config inside text_config, K2.7-Code the flat kimi_k2 form with it
at the top level, so both placements are covered.
"""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import k2mlx.loading
from k2mlx.config import ModelArgs
from k2mlx.loading.formats import COMPRESSED, detect

from .conftest import CT_IGNORE, ct_quantization_config, rename_checkpoint

K2_TEXT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 384, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
    "bos_token_id": 163584, "eos_token_id": 163585, "torch_dtype": "bfloat16",
}


def k2_6_config(text: dict = K2_TEXT) -> dict:
    """K2.6 (reconstruction): nested, quantization_config inside text_config."""
    return {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
            "text_config": {**text, "quantization_config": ct_quantization_config(32)},
            "vision_config": {"model_type": "moonvit", "hidden_size": 1152, "num_hidden_layers": 27},
            "tie_word_embeddings": False}


def k2_7_code_config(text: dict = K2_TEXT) -> dict:
    """K2.7-Code (reconstruction): flat kimi_k2, quantization_config at the top level."""
    return {**text, "quantization_config": ct_quantization_config(32)}


CONFIGS = {"K2.6": k2_6_config, "K2.7-Code": k2_7_code_config}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_parses_as_k2_int4(name):
    cfg = CONFIGS[name]()
    args = ModelArgs.from_dict(cfg)
    assert (args.num_hidden_layers, args.num_attention_heads, args.n_routed_experts) == (61, 64, 384)
    src = detect(cfg)
    assert src.kind == COMPRESSED and (src.scheme.bits, src.scheme.group_size) == (4, 32)
    assert src.scheme.ignore == tuple(CT_IGNORE)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_sizes_the_int4_release(name, tmp_path):
    """About 595 GB as released (INT4 routed experts, the rest bf16) plus, in MLX's affine form,
    one bf16 bias per group of 32 expert weights (-8 x scale); it fits two 512 GB Macs."""
    import contextlib
    import io

    from k2mlx.cli import main

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", "--model", str(tmp_path), "--memory", "512,512", "--json"])
    plan = json.loads(out.getvalue())
    assert rc == 0 and plan["fits"] and plan["num_layers"] == 61
    expert_weights = 60 * 384 * 3 * 2048 * 7168
    biases = expert_weights // 32 * 2
    assert 585e9 < plan["weight_bytes"] - biases < 605e9, plan["weight_bytes"]
    assert [h["layers"] for h in plan["hosts"]][0][0] == 0 and plan["hosts"][-1]["layers"][1] == 60


@pytest.fixture(scope="module")
def family_cases(int4_case, tmp_path_factory):
    """The tiny INT4 checkpoint under each release's config form (tensors renamed as shipped)."""
    folder, reference = int4_case
    text = json.loads((folder / "config.json").read_text())
    text.pop("quantization_config")
    root = tmp_path_factory.mktemp("k2-family")
    k26 = rename_checkpoint(folder, root / "k2.6", lambda n: "language_model." + n, k2_6_config(text))
    k27 = rename_checkpoint(folder, root / "k2.7-code", lambda n: n, k2_7_code_config(text))
    return {"K2.6": k26, "K2.7-Code": k27}, reference


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_release_form_loads_and_matches_the_reference(name, family_cases, ref, prompt_tokens):
    cases, reference = family_cases
    model = k2mlx.loading.load_model(cases[name], dtype="float32")
    sw = model.model.layers[1].mlp.switch_mlp.down_proj
    assert (sw.bits, sw.group_size) == (4, 32)  # the stored INT4 words, group 32, not requantized
    got = np.array(model(mx.array([prompt_tokens])).astype(mx.float32))[0]
    want = ref.reference_logits(reference, prompt_tokens)
    assert np.abs(got - want).max() < 1e-5
    stage = k2mlx.loading.load_model(cases[name], layers=range(1, 2), dtype="float32")
    assert stage.layer_range == range(1, 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_check_passes_on_the_tiny_release_form(name, family_cases):
    from k2mlx.loading.check import check

    r = check(family_cases[0][name])
    # the fixtures carry no tokenizer; everything about the weights is clean
    assert [x.split(":")[0] for x in r.faults] == ["missing tokenizer", "missing chat template"], r.faults


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_check_names_only_the_truncated_int4_shard(name, family_cases, tmp_path):
    """The experts of a truncated shard are not also reported missing (their stacked names map
    back to the per-expert weight_packed tensors of that shard)."""
    import shutil

    from k2mlx.loading.check import check

    d = tmp_path / "ckpt"
    shutil.copytree(family_cases[0][name], d)
    f = d / "model-layer01.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    faults = [x for x in check(d).faults if not x.startswith(("missing tokenizer", "missing chat template"))]
    assert len(faults) == 1 and faults[0].startswith("truncated shard: model-layer01.safetensors"), faults
