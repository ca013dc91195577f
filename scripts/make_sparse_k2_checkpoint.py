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

BYTES = {"BF16": 2, "F32": 4, "I32": 4, "I64": 8}
HEADS, HIDDEN, LAYERS, EXPERTS, INTER = 64, 7168, 61, 384, 2048


def layer_tensors(i: int) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype tag, shape)} of decoder layer i, as the INT4 release stores it."""
    p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    t = {p + "input_layernorm.weight": ("BF16", [HIDDEN]), p + "post_attention_layernorm.weight": ("BF16", [HIDDEN]),
         a + "q_a_proj.weight": ("BF16", [1536, HIDDEN]), a + "q_a_layernorm.weight": ("BF16", [1536]),
         a + "q_b_proj.weight": ("BF16", [HEADS * 192, 1536]),
         a + "kv_a_proj_with_mqa.weight": ("BF16", [576, HIDDEN]), a + "kv_a_layernorm.weight": ("BF16", [512]),
         a + "kv_b_proj.weight": ("BF16", [HEADS * 256, 512]), a + "o_proj.weight": ("BF16", [HIDDEN, HEADS * 128])}
    if i == 0:  # first_k_dense_replace = 1
        for n, shape in (("gate_proj", [18432, HIDDEN]), ("up_proj", [18432, HIDDEN]), ("down_proj", [HIDDEN, 18432])):
            t[m + n + ".weight"] = ("BF16", shape)
        return t
    t[m + "gate.weight"] = ("BF16", [EXPERTS, HIDDEN])
    t[m + "gate.e_score_correction_bias"] = ("F32", [EXPERTS])
    for n, shape in (("gate_proj", [INTER, HIDDEN]), ("up_proj", [INTER, HIDDEN]), ("down_proj", [HIDDEN, INTER])):
        t[m + "shared_experts." + n + ".weight"] = ("BF16", shape)
    for e in range(EXPERTS):
        for n, (rows, cols) in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                                ("down_proj", (HIDDEN, INTER))):
            b = f"{m}experts.{e}.{n}."
            t[b + "weight_packed"] = ("I32", [rows, cols // 8])
            t[b + "weight_scale"] = ("BF16", [rows, cols // 32])
            t[b + "weight_shape"] = ("I64", [2])
    return t


def write_sparse(path: Path, tensors: dict) -> int:
    """A real safetensors header, then a hole of the data's size (no bytes written)."""
    header, offset = {}, 0
    for name, (tag, shape) in tensors.items():
        n = BYTES[tag]
        for d in shape:
            n *= d
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i in range(LAYERS):
        t = layer_tensors(i)
        if i == 0:
            t["model.embed_tokens.weight"] = ("BF16", [163840, HIDDEN])
        if i == LAYERS - 1:
            t["model.norm.weight"] = ("BF16", [HIDDEN])
            t["lm_head.weight"] = ("BF16", [163840, HIDDEN])
        name = f"model-{i + 1:05d}-of-{LAYERS:05d}.safetensors"
        total += write_sparse(folder / name, t)
        weight_map.update({k: name for k in t})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(k2_7_code_config()))
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):  # a tokenizer to find
        shutil.copy(ROOT / "k2mlx" / "assets" / "k2-nano" / f, folder)
    print(f"{folder}: {total / 1e9:.1f} GB of tensor data (sparse), {len(weight_map)} tensors")


if __name__ == "__main__":
    main(sys.argv[1])
