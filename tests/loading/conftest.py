"""Session fixtures for the loading tests: checkpoints in each source format, written from
known weights, next to a transformers DeepseekV3 reference (PyTorch CPU, float32) that holds
exactly the dequantized values. Tiny shapes; nothing is downloaded."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from k2mlx.loading.formats import compressed_tensors as ct
from k2mlx.loading.formats import fp8
from k2mlx.loading.formats.writer import write_safetensors

_REF_PATH = Path(__file__).resolve().parents[1] / "model" / "reference.py"


def import_file(path: Path, name: str):
    """A Python file outside the test packages (a script, another suite's helper) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reference_module():
    """tests/model/reference.py (the model helper's transformers reference builders)."""
    return import_file(_REF_PATH, "k2mlx_test_reference")


@pytest.fixture(scope="session")
def ref():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return _reference_module()


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 value (as float32), round half to even."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values already representable in bf16 -> their uint16 words."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_layer_shards(folder: Path, tensors: dict, config: dict) -> Path:
    """One shard per decoder layer (+ one for the embedding, one for norm/head), with tags.

    tensors: {name: (numpy array, safetensors dtype tag)}. Layer-per-shard makes the per-layer
    loading tests sharp: each stage needs a known subset of files."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):02d}" if name.startswith("model.layers.") else (
            "embed" if "embed_tokens" in name else "head")
        groups.setdefault(key, {})[name] = t
    weight_map = {}
    for key, part in sorted(groups.items()):
        fname = f"model-{key}.safetensors"
        write_safetensors(folder / fname, part)
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def _set_experts(model, layer: int, proj: str, values: list[np.ndarray], inter: int):
    """Write per-expert weights into transformers' fused expert tensors."""
    import torch

    experts = model.model.layers[layer].mlp.experts
    with torch.no_grad():
        for e, v in enumerate(values):
            t = torch.from_numpy(np.ascontiguousarray(v))
            if proj == "gate_proj":
                experts.gate_up_proj[e, :inter] = t
            elif proj == "up_proj":
                experts.gate_up_proj[e, inter:] = t
            else:
                experts.down_proj[e] = t


CT_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def ct_quantization_config(group_size=32):
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": 4, "group_size": group_size, "symmetric": True,
                                                  "strategy": "group", "type": "int", "dynamic": False}}},
        "ignore": CT_IGNORE, "kv_cache_scheme": None,
    }


@pytest.fixture(scope="session")
def int4_case(ref, tmp_path_factory):
    """(folder, reference model): K2-Thinking-style compressed-tensors INT4 routed experts from
    known integer codes and bf16 scales; everything else bf16 (values rounded to bf16 so the
    reference holds exactly what the file holds)."""
    cfg = ref.K2_TINY
    model = ref.build_reference(cfg, seed=5)
    tensors = ref.k2_layout_tensors(model, cfg)
    rng = np.random.default_rng(5)
    out, exact = {}, {}
    for name, w in tensors.items():
        if ".mlp.experts." in name:  # model.layers.{i}.mlp.experts.{e}.{proj}.weight
            rows, cols = w.shape
            codes = rng.integers(-8, 8, size=(rows, cols))  # every code, including -8 and 7
            amax = np.abs(w).reshape(rows, cols // 32, 32).max(-1)
            scale = bf16_round(amax / 7 * rng.uniform(0.8, 1.2, amax.shape)).astype(np.float32)
            base = name[: -len(".weight")]
            out[base + ".weight_packed"] = (ct.pack_numpy(codes), "I32")
            out[base + ".weight_scale"] = (bf16_bits(scale), "BF16")
            out[base + ".weight_shape"] = (np.array([rows, cols], np.int64), "I64")
            exact[name] = (codes.reshape(rows, cols // 32, 32) * scale[..., None]).reshape(rows, cols)
        elif "e_score_correction_bias" in name:
            out[name], exact[name] = (w.astype(np.float32), "F32"), w
        else:
            exact[name] = bf16_round(w)
            out[name] = (bf16_bits(exact[name]), "BF16")
    _load_exact(model, exact, cfg)
    config = dict(ref.k2_config_json(cfg), quantization_config=ct_quantization_config(), torch_dtype="bfloat16")
    folder = write_layer_shards(tmp_path_factory.mktemp("int4") / "k2-int4", out, config)
    return folder, model


@pytest.fixture(scope="session")
def fp8_case(ref, tmp_path_factory):
    """(folder, reference model): K2-Instruct-style FP8 e4m3 linears with 128x128 block scales
    (tiny shapes, so most matrices are one ragged block; q_b_proj / kv_b_proj / lm_head span
    several), bf16 norms, router and embeddings."""
    cfg = ref.K2_TINY
    model = ref.build_reference(cfg, seed=6)
    tensors = ref.k2_layout_tensors(model, cfg)
    rng = np.random.default_rng(6)
    out, exact = {}, {}
    for name, w in tensors.items():
        is_linear = name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight")
        if is_linear:
            rows, cols = w.shape
            gr, gc = -(-rows // 128), -(-cols // 128)
            pad = np.zeros((gr * 128, gc * 128), np.float32)
            pad[:rows, :cols] = np.abs(w)
            amax = pad.reshape(gr, 128, gc, 128).max(axis=(1, 3))
            scale = (amax / 448 * rng.uniform(1.0, 1.5, amax.shape)).astype(np.float32)
            s_full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:rows, :cols]
            codes = fp8.encode_e4m3_numpy(w / s_full)
            out[name] = (codes, "F8_E4M3")
            out[name[: -len(".weight")] + ".weight_scale_inv"] = (scale, "F32")
            exact[name] = fp8.dequantize_numpy(codes, scale)
        else:
            v = bf16_round(w)
            out[name] = (bf16_bits(v), "BF16") if "e_score_correction_bias" not in name else (w.astype(np.float32), "F32")
            exact[name] = v if "e_score_correction_bias" not in name else w
    _load_exact(model, exact, cfg)
    config = dict(ref.k2_config_json(cfg), torch_dtype="bfloat16",
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]})
    folder = write_layer_shards(tmp_path_factory.mktemp("fp8") / "k2-fp8", out, config)
    return folder, model


def _load_exact(model, exact: dict, cfg: dict):
    """Copy K2-layout numpy tensors (per-expert names) into the transformers model."""
    import torch

    per_layer = {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, v in exact.items():
            if ".mlp.experts." in name:
                m = name.split(".")
                per_layer.setdefault((int(m[2]), m[6]), {})[int(m[5])] = v
            elif name in params:
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
            else:
                buffers[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    for (layer, proj), experts in per_layer.items():
        _set_experts(model, layer, proj, [experts[e] for e in range(len(experts))], cfg["moe_intermediate_size"])


@pytest.fixture(scope="session")
def prompt_tokens(ref):
    return [int(t) for t in np.random.RandomState(3).randint(0, ref.K2_TINY["vocab_size"], 24)]


@pytest.fixture(scope="session")
def bf16_case(ref, tmp_path_factory):
    """(folder, reference): a plain bf16 checkpoint in the real K2 layout, one shard per layer."""
    cfg = ref.K2_TINY
    model = ref.build_reference(cfg, seed=7)
    tensors = ref.k2_layout_tensors(model, cfg)
    exact, out = {}, {}
    for name, w in tensors.items():
        v = bf16_round(w)
        exact[name] = v
        out[name] = (bf16_bits(v), "BF16")
    _load_exact(model, exact, cfg)
    config = dict(ref.k2_config_json(cfg), torch_dtype="bfloat16")
    folder = write_layer_shards(tmp_path_factory.mktemp("bf16") / "k2-bf16", out, config)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder, model


@pytest.fixture(scope="session")
def confident_case(ref, tmp_path_factory):
    """A bf16 checkpoint whose next token is clear, as in a trained model: the head holds a
    permuted copy of the embedding (top logit ~10 above the next, instead of the ~0.1 of
    random Gaussian logits) and the layers' output projections are halved. On purely random
    weights greedy decoding flips on a coin toss at every step whatever the precision, so
    'greedy output unchanged by 8-bit' can only be asked of a model like this one."""
    cfg = ref.K2_TINY
    model = ref.build_reference(cfg, seed=7)
    tensors = ref.k2_layout_tensors(model, cfg)
    rng = np.random.default_rng(0)
    emb = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = 0.5 * emb[rng.permutation(len(emb))] + tensors["lm_head.weight"]
    for n in tensors:
        if n.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[n] = 0.5 * tensors[n]
    out = {n: (bf16_bits(bf16_round(w)), "BF16") for n, w in tensors.items()}
    folder = write_layer_shards(tmp_path_factory.mktemp("confident") / "k2-bf16", out,
                                dict(ref.k2_config_json(cfg), torch_dtype="bfloat16"))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def rename_checkpoint(src: Path, dst: Path, rename, config: dict) -> Path:
    """Copy a checkpoint with every tensor renamed (raw bytes and dtype tags kept)."""
    import struct

    from k2mlx.loading.shards import read_header

    dst.mkdir(parents=True)
    weight_map = {}
    for f in sorted(src.glob("*.safetensors")):
        raw = f.read_bytes()
        start = 8 + struct.unpack("<Q", raw[:8])[0]
        tensors = {}
        for name, info in read_header(f).items():
            a, b = info["data_offsets"]
            buf = np.frombuffer(raw[start + a: start + b], dtype=np.uint8)
            tensors[rename(name)] = (buf.reshape(-1), info["dtype"], info["shape"])
        header, offset = {}, 0
        for name, (buf, tag, shape) in tensors.items():
            header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + buf.nbytes]}
            offset += buf.nbytes
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(dst / f.name, "wb") as out:
            out.write(struct.pack("<Q", len(h)) + h)
            for buf, _, _ in tensors.values():
                out.write(buf.tobytes())
        weight_map.update({k: f.name for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


@pytest.fixture(scope="session")
def k25_int4_case(int4_case, tmp_path_factory):
    """The INT4 checkpoint as K2.5 ships it: model_type kimi_k25, the text config nested under
    text_config, tensors under `language_model.`, quantization_config at the top level."""
    folder, reference = int4_case
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    k25 = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
           "text_config": cfg, "quantization_config": qc}
    dst = tmp_path_factory.mktemp("k25") / "k25-int4"
    return rename_checkpoint(folder, dst, lambda n: "language_model." + n, k25), reference
