#!/usr/bin/env python
"""Write a K2.7-Code-shaped checkpoint (the reconstructed config of
tests/loading/test_k2_family_configs.py: 61 layers, 384 experts per layer in compressed-tensors
INT4 group 32, the rest bf16; one shard per layer) whose data is sparse: the headers are real,
the files have their full sizes (about 594 GB), the disk holds about 50 MB. For timing
`k2mlx check` at K2's real scale:

    python scripts/make_sparse_k2_checkpoint.py /tmp/k27 && /usr/bin/time -v k2mlx check --model /tmp/k27
"""
import json
import os
import shutil
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.loading.test_k2_family_configs import k2_7_code_config  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
cfg = k2_7_code_config()
H, hid, L, E, I = 64, 7168, 61, 384, 2048
BYTES = {"BF16": 2, "F32": 4, "I32": 4, "I64": 8}
def layer_tensors(i):
    t = {}
    p = f"model.layers.{i}."
    t[p+"input_layernorm.weight"] = ("BF16", [hid]); t[p+"post_attention_layernorm.weight"] = ("BF16", [hid])
    a = p+"self_attn."
    t[a+"q_a_proj.weight"] = ("BF16", [1536, hid]); t[a+"q_a_layernorm.weight"] = ("BF16", [1536])
    t[a+"q_b_proj.weight"] = ("BF16", [H*192, 1536]); t[a+"kv_a_proj_with_mqa.weight"] = ("BF16", [576, hid])
    t[a+"kv_a_layernorm.weight"] = ("BF16", [512]); t[a+"kv_b_proj.weight"] = ("BF16", [H*256, 512])
    t[a+"o_proj.weight"] = ("BF16", [hid, H*128])
    m = p+"mlp."
    if i == 0:
        for n, s in (("gate_proj", [18432, hid]), ("up_proj", [18432, hid]), ("down_proj", [hid, 18432])):
            t[m+n+".weight"] = ("BF16", s)
    else:
        t[m+"gate.weight"] = ("BF16", [E, hid]); t[m+"gate.e_score_correction_bias"] = ("F32", [E])
        for n, s in (("gate_proj", [I, hid]), ("up_proj", [I, hid]), ("down_proj", [hid, I])):
            t[m+"shared_experts."+n+".weight"] = ("BF16", s)
        for e in range(E):
            for n, (o, inn) in (("gate_proj", (I, hid)), ("up_proj", (I, hid)), ("down_proj", (hid, I))):
                b = f"{m}experts.{e}.{n}."
                t[b+"weight_packed"] = ("I32", [o, inn // 8]); t[b+"weight_scale"] = ("BF16", [o, inn // 32])
                t[b+"weight_shape"] = ("I64", [2])
    return t
def write(fname, tensors):
    header, off = {}, 0
    for k, (dt, shape) in tensors.items():
        n = BYTES[dt]
        for d in shape: n *= d
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}; off += n
    h = json.dumps(header).encode(); h += b" " * (-len(h) % 8)
    with open(os.path.join(out, fname), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h); f.truncate(8 + len(h) + off)  # sparse data
    return off
wm, total = {}, 0
for i in range(L):
    t = layer_tensors(i)
    if i == 0: t["model.embed_tokens.weight"] = ("BF16", [163840, hid])
    if i == L - 1: t["model.norm.weight"] = ("BF16", [hid]); t["lm_head.weight"] = ("BF16", [163840, hid])
    fn = f"model-{i+1:05d}-of-{L:05d}.safetensors"
    total += write(fn, t); wm.update({k: fn for k in t})
json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):  # a tokenizer to find
    shutil.copy(ROOT / "k2mlx" / "assets" / "k2-nano" / f, out)
print(total / 1e9, "GB", len(wm), "tensors")
