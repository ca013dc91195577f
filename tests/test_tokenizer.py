"""KimiTokenizer against the K2 format, the BPE trainer, and the tiny checkpoint writer."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from k2mlx.errors import CheckpointError
from k2mlx.tokenizer import (
    K2_SPECIAL_OFFSETS,
    KimiTokenizer,
    load_tokenizer,
    read_tiktoken_model,
    save_tokenizer,
    train_bpe,
)

# ids from Moonshot's Kimi-K2 tokenizer_config.json (../shared/k2-reference.md)
REAL_K2_IDS = {
    "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
    "<|im_assistant|>": 163588, "<|start_header_id|>": 163590, "<|end_header_id|>": 163591,
    "[EOT]": 163593, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
    "<think>": 163606, "</think>": 163607, "[UNK]": 163838, "[PAD]": 163839,
}

SAMPLES = [
    "Hello, world! It's 2026 and we'll test: don't stop.",
    "你好世界，今天天气很好。Mixed 中文 and English123.",
    "  leading spaces\n\n\ttabs\r\nand CRLF   trailing   ",
    "emoji 🤖🧪 and accents: naïve café Ångström",
    '{"city": "Rome", "n": [1, 2, 3], "ok": true}',
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_user|>user<|im_middle|>hi<|im_end|>",
    "",
]


def test_real_k2_layout_gives_reference_ids(tmp_path):
    """A vocabulary of K2's real size with K2's tokenizer_config.json: special ids as in K2."""
    n = 163584
    single = [bytes([b]) for b in range(256)]
    rest = [b"t%06d" % i for i in range(n - 256)]  # distinct filler tokens
    (tmp_path / "tiktoken.model").write_text(
        "\n".join(f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(single + rest)) + "\n"
    )
    decoder = {str(i): {"content": name, "special": True} for name, i in REAL_K2_IDS.items()}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]",
                    "chat_template": "{{ messages }}"})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.num_base_tokens == n
    assert tok.vocab_size == n + 256 == 163840  # K2's config.json vocab_size
    for name, i in REAL_K2_IDS.items():
        assert tok.special_tokens[name] == i
        assert tok.token_to_id(name) == i
        assert tok.encode(name) == [i]
    assert tok.special_tokens["<|reserved_token_163589|>"] == 163589
    assert tok.bos_token_id == 163584 and tok.eos_token_id == 163585
    assert tok.eos_token_ids == {163585, 163586}
    assert tok.chat_template == "{{ messages }}"  # from tokenizer_config.json when no .jinja file


def test_roundtrip_and_special_handling(tiny_tokenizer):
    tok = tiny_tokenizer
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert all(0 <= i < tok.vocab_size for i in ids)
        # the bytes of the ids concatenate to the UTF-8 text
        assert b"".join(tok.id_to_bytes(i) for i in ids) == s.encode("utf-8")
    im_end = tok.special_tokens["<|im_end|>"]
    assert tok.encode("a<|im_end|>b").count(im_end) == 1
    plain = tok.encode("a<|im_end|>b", allow_special=False)
    assert im_end not in plain and tok.decode(plain) == "a<|im_end|>b"


def test_offsets_follow_k2(tiny_tokenizer):
    tok = tiny_tokenizer
    base = tok.num_base_tokens
    assert 256 < base < 4096
    for name, off in K2_SPECIAL_OFFSETS.items():
        assert tok.special_tokens[name] == base + off
    # an Instruct-style tiny checkpoint leaves the think slots reserved, like K2-Instruct
    assert "<think>" not in tok.special_tokens
    assert tok.eos_token_ids == {base + 1, base + 2}


def test_thinking_tokens(tiny_thinking_checkpoint):
    tok = load_tokenizer(tiny_thinking_checkpoint)
    base = tok.num_base_tokens
    assert tok.special_tokens["<think>"] == base + 22
    assert tok.special_tokens["</think>"] == base + 23
    assert "<think>" in tok.chat_template


def test_bpe_compresses_and_matches_tiktoken_split(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog. " * 3, "the lazy dog sleeps; the fox runs."] * 20
    ranks = train_bpe(texts, 50)
    assert 256 < len(ranks) <= 306
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert ranks[b" the"] > 255  # a frequent word became one token
    save_tokenizer(tmp_path, ranks)
    tok = load_tokenizer(tmp_path)
    text = texts[0]
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2
    assert tok.decode(ids) == text
    # deterministic: same input, same vocabulary
    assert train_bpe(texts, 50) == ranks


def test_mlx_lm_streaming_detokenizers(tiny_thinking_checkpoint):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, NaiveStreamingDetokenizer, TokenizerWrapper

    tok = load_tokenizer(tiny_thinking_checkpoint)
    text = "Streaming 你好 ünïcode🤖 text,\nover lines. Done"
    ids = tok.encode(text)
    for cls in (NaiveStreamingDetokenizer, BPEStreamingDetokenizer):
        det = cls(tok)
        pieces = []
        for i in ids:
            det.add_token(i)
            pieces.append(det.last_segment)
        det.finalize()
        pieces.append(det.last_segment)
        assert "".join(pieces) == text, cls
        assert not any("\ufffd" in p for p in pieces)
    # mlx-lm's wrapper finds K2's stop and think tokens and renders chats through our template
    w = TokenizerWrapper(tok, eos_token_ids=tok.eos_token_ids)
    assert w.eos_token_ids == tok.eos_token_ids
    assert w.think_start == "<think>" and w.think_start_id == tok.special_tokens["<think>"]
    msgs = [{"role": "user", "content": "hi"}]
    from k2mlx.chat.template import render_tokens

    assert w.apply_chat_template(msgs, add_generation_prompt=True) == render_tokens(tok, msgs)
    assert tok.get_vocab()["<|im_end|>"] == tok.special_tokens["<|im_end|>"]


def test_bad_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tiktoken.model").write_text("not-base64!! x\n")
    with pytest.raises(CheckpointError, match="line 1"):
        read_tiktoken_model(tmp_path / "tiktoken.model")


def test_decode_accepts_arrays(tiny_tokenizer):
    ids = tiny_tokenizer.encode("array input")
    assert tiny_tokenizer.decode(np.array(ids)) == "array input"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_tokenizer.id_to_bytes(tiny_tokenizer.vocab_size)


# ---- tiny checkpoints ---------------------------------------------------------------------------
def test_tiny_checkpoint_layout(tiny_checkpoint, tiny_tokenizer):
    from safetensors import safe_open

    p = tiny_checkpoint
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["rope_scaling"]["type"] == "yarn" and "rope_theta" in cfg and "rope_parameters" not in cfg
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 4 and cfg["n_routed_experts"] == 16
    assert cfg["vocab_size"] == tiny_tokenizer.num_base_tokens + 256
    index = json.loads((p / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    seen = {}
    for f in files:
        with safe_open(p / f, "np") as sf:
            for k in sf.keys():
                assert index["weight_map"][k] == f
                seen[k] = sf.get_tensor(k)
    assert set(seen) == set(index["weight_map"])
    H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    assert seen["model.layers.0.mlp.gate_proj.weight"].shape == (cfg["intermediate_size"], H)  # dense layer 0
    for e in range(E):
        assert seen[f"model.layers.3.mlp.experts.{e}.gate_proj.weight"].shape == (I, H)
        assert seen[f"model.layers.3.mlp.experts.{e}.down_proj.weight"].shape == (H, I)
    assert seen["model.layers.1.mlp.gate.e_score_correction_bias"].shape == (E,)
    kv = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert seen["model.layers.2.self_attn.kv_a_proj_with_mqa.weight"].shape == (kv, H)
    assert seen["lm_head.weight"].shape == (cfg["vocab_size"], H)
    # layers are spread over shards in order: the last layer's tensors are not in the first file
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["model.layers.3.mlp.experts.0.up_proj.weight"] == files[-1]
    gen = json.loads((p / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tiny_tokenizer.special_tokens["<|im_end|>"]
    assert (p / "chat_template.jinja").read_text() == tiny_tokenizer.chat_template


def test_tiny_checkpoint_deterministic_and_bf16(tmp_path):
    from k2mlx.tiny import make_tiny_checkpoint
    from safetensors import safe_open

    a = make_tiny_checkpoint(tmp_path / "a", seed=3, num_shards=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3, num_shards=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=3, dtype="bfloat16", num_shards=3)
    for f in ["config.json", "tiktoken.model", "model-00002-of-00003.safetensors"]:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    import mlx.core as mx

    name = "model.layers.2.mlp.experts.7.up_proj.weight"
    fname = json.loads((c / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(a / fname, "np") as sf:
        ref = sf.get_tensor(name)
    w = mx.load(str(c / fname))
    assert w[name].dtype == mx.bfloat16
    assert w["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == mx.float32  # as in K2
    got = np.array(w[name].astype(mx.float32))
    assert np.abs(got - ref).max() <= np.abs(ref).max() * 2**-8  # bf16 rounding only
    d = make_tiny_checkpoint(tmp_path / "d", seed=4)
    assert (d / "model-00002-of-00002.safetensors").read_bytes() != (a / "model-00002-of-00003.safetensors").read_bytes()


def test_script_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_checkpoint.py"
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, str(script), str(out), "--seed", "1", "--set", "n_group=4",
                        "--set", "topk_group=2", "--set", "q_lora_rank=null"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_group"] == 4 and cfg["topk_group"] == 2 and cfg["q_lora_rank"] is None
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.q_proj.weight" in wm and "model.layers.0.self_attn.q_a_proj.weight" not in wm
