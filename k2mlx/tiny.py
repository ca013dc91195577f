"""Tiny K2-shaped checkpoints in the real Hugging Face layout, written with numpy only.

What `write_checkpoint` produces is laid out like `moonshotai/Kimi-K2-Instruct`:
`config.json` (model_type kimi_k2, DeepseekV3ForCausalLM, top-level rope_theta / YaRN
rope_scaling, every K2 key scaled down), random weights with one tensor per expert and
projection (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`) split over several
safetensors shards plus `model.safetensors.index.json`, a real tiktoken-format tokenizer with
K2's special tokens (`k2mlx.tokenizer`), `chat_template.jinja` and `generation_config.json`.

No torch, numpy only: tests, scripts and benchmarks write their checkpoints with it. Loading
never depends on it (the default model is the embedded k2-nano; see k2mlx.loading.resolve).
Everything is seeded and deterministic.
"""
from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np

# bump when the files written here change (stamped into k2mlx_tiny.json; caches compare it)
TINY_FORMAT_VERSION = 1

PRESETS: dict[str, dict] = {
    # tests: everything small enough that a forward pass costs milliseconds on a CPU
    "nano": dict(
        hidden_size=64, num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        original_max_position_embeddings=256, rope_factor=32.0, n_merges=768,
    ),
    # a larger option: still seconds to build, big enough for engine/batching work
    "small": dict(
        hidden_size=256, num_hidden_layers=6, intermediate_size=512, moe_intermediate_size=128,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, num_attention_heads=8,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        original_max_position_embeddings=512, rope_factor=32.0, n_merges=3840,
    ),
}


def k2_config(num_base_tokens: int, preset: str = "nano", **overrides) -> dict:
    """A K2 `config.json` dict scaled down per `preset`; `overrides` replace any key (pass
    `q_lora_rank=None` for the q_proj path, `n_group`/`topk_group` for group-limited routing)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = {**PRESETS[preset], **overrides}
    orig = p.pop("original_max_position_embeddings")
    factor = p.pop("rope_factor")
    p.pop("n_merges", None)
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": num_base_tokens,  # [BOS]
        "eos_token_id": num_base_tokens + 1,  # [EOS]
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": int(orig * factor),
        "model_type": "kimi_k2",
        "moe_layer_freq": 1,
        "n_group": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "beta_fast": 1.0, "beta_slow": 1.0, "factor": float(factor), "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": orig, "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3",
        "use_cache": True,
        # K2: 163840 = 163584 base + 256 special slots
        "vocab_size": num_base_tokens + 256,
    }
    cfg.update(p)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return dict(sorted(cfg.items()))


# ---- weights ----------------------------------------------------------------------------------
def _weight_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of a K2 checkpoint, in file order. Kinds choose the
    initialisation: linear, embed, norm, bias."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (V, H), "embed")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,), "norm"), (p + "post_attention_layernorm.weight", (H,), "norm")]
        a = p + "self_attn."
        if cfg.get("q_lora_rank"):
            r = cfg["q_lora_rank"]
            out += [(a + "q_a_proj.weight", (r, H), "linear"), (a + "q_a_layernorm.weight", (r,), "norm"),
                    (a + "q_b_proj.weight", (nh * qk, r), "linear")]
        else:
            out += [(a + "q_proj.weight", (nh * qk, H), "linear")]
        kv = cfg["kv_lora_rank"]
        out += [
            (a + "kv_a_proj_with_mqa.weight", (kv + cfg["qk_rope_head_dim"], H), "linear"),
            (a + "kv_a_layernorm.weight", (kv,), "norm"),
            (a + "kv_b_proj.weight", (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kv), "linear"),
            (a + "o_proj.weight", (H, nh * cfg["v_head_dim"]), "linear"),
        ]
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            out += [(m + "gate_proj.weight", (inter, H), "linear"), (m + "up_proj.weight", (inter, H), "linear"),
                    (m + "down_proj.weight", (H, inter), "linear")]
            continue
        E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        out += [(m + "gate.weight", (E, H), "linear"), (m + "gate.e_score_correction_bias", (E,), "bias")]
        for e in range(E):
            x = f"{m}experts.{e}."
            out += [(x + "gate_proj.weight", (inter, H), "linear"), (x + "up_proj.weight", (inter, H), "linear"),
                    (x + "down_proj.weight", (H, inter), "linear")]
        if cfg.get("n_shared_experts"):
            si = inter * cfg["n_shared_experts"]
            s = m + "shared_experts."
            out += [(s + "gate_proj.weight", (si, H), "linear"), (s + "up_proj.weight", (si, H), "linear"),
                    (s + "down_proj.weight", (H, si), "linear")]
    out += [("model.norm.weight", (H,), "norm"), ("lm_head.weight", (V, H), "linear")]
    return out


def _init(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "linear":  # fan-in scaling keeps activations O(1) through the random stack
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if kind == "embed":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "norm":  # not all ones, so a norm applied twice or skipped is caught
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "bias":  # non-zero, so selection on sigmoid + bias differs from plain sigmoid
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    raise ValueError(kind)


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights for every tensor of `cfg`, keyed by Hugging Face K2 names."""
    rng = np.random.default_rng(seed)
    return {name: _init(rng, shape, kind) for name, shape, kind in _weight_specs(cfg)}


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
              np.dtype(np.uint32): "U32", np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], bf16: set[str] = frozenset(),
                     metadata: dict | None = None) -> int:
    """Write a safetensors file; names in `bf16` are stored as BF16. Returns the data size."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        if name in bf16:
            data, dt = _to_bf16_bits(arr).tobytes(), "BF16"
        else:
            arr = np.ascontiguousarray(arr)
            data, dt = arr.tobytes(), _ST_DTYPES[arr.dtype]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)
    return offset


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def write_weights(path: str | os.PathLike, cfg: dict, weights: dict[str, np.ndarray], dtype: str = "float32",
                  num_shards: int = 2) -> None:
    """Write `weights` as `model-0000k-of-0000n.safetensors` shards + the index. Layers are spread
    over the shards in order (embeddings in the first, final norm and lm_head in the last), so a
    pipeline stage needs only some of the files. bf16 keeps the router bias in float32, as K2."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    path = Path(path)
    L = cfg["num_hidden_layers"]
    num_shards = max(1, min(num_shards, L + 1))
    shards: list[dict[str, np.ndarray]] = [{} for _ in range(num_shards)]
    for name, arr in weights.items():
        layer = _layer_of(name)
        if layer is not None:
            k = min(layer * num_shards // max(L, 1), num_shards - 1)
        else:
            k = 0 if name.startswith("model.embed_tokens") else num_shards - 1
        shards[k][name] = arr
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        bf16 = {n for n in tensors if dtype == "bfloat16" and not n.endswith("e_score_correction_bias")}
        total += save_safetensors(path / fname, tensors, bf16=bf16)
        weight_map.update({n: fname for n in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- a corpus for the tiny tokenizer ----------------------------------------------------------
_WORDS = (
    "the a an of to in and is it that for on with as was at by be this from are or have not but "
    "what all were when we there can which one your you their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use "
    "may water long little very after words called just where most know get through back much "
    "before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why "
    "help put different away again off went old number great tell men say small every found still "
    "between name should home big give air line set own under read last never us left end along "
    "while might next sound below saw something thought both few those always show large often "
    "together asked house world going want school important until form food keep children feet "
    "land side without boy once animal life enough took four head above kind began almost live "
    "page got earth need far hand high year mother light country father let night picture being "
    "study second soon story since white ever paper hard near sentence better best across during "
    "today however sure knew try told young sun thing whole hear example heard several change "
    "answer room sea against top turned learn point city play toward five himself usually money "
    "seen car morning body upon family later turn move face door cut done group true leave hello "
    "weather file folder model token tool call function result error please thanks question "
    "assistant user system code python json list string value data memory cache layer expert"
).split()
_NAMES = ("get_weather", "read_file", "list_dir", "calculator", "search", "write_file", "run_shell")
_CITIES = ("Rome", "Paris", "Tokyo", "Berlin", "Lima", "Oslo", "Cairo", "Austin", "Beijing", "Madrid")
_ZH = "你好世界今天天气很好我们一起学习模型的工具调用请问有什么可以帮您"
_CODE = (
    "def main(args):\n    return run(args)\n", "for i in range(10):\n    print(i)\n",
    "import json\nimport os\n", "if x is None:\n    raise ValueError(\"x\")\n",
    "class Model:\n    def __init__(self, config):\n        self.config = config\n",
    "x = [1, 2, 3]\ny = {\"a\": 1, \"b\": [true, false, null]}\n",
)


def tiny_corpus(seed: int = 0, n: int = 1500) -> list[str]:
    """Deterministic synthetic text: sentences, JSON tool arguments, code, numbers, some Chinese,
    and the role names of K2's chat format, so the tiny BPE learns useful merges."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        k = i % 6
        if k <= 1:
            w = [r.choice(_WORDS) for _ in range(r.randint(4, 14))]
            out.append(w[0].capitalize() + " " + " ".join(w[1:]) + r.choice((".", "?", "!", ",")) + "\n")
        elif k == 2:
            name = r.choice(_NAMES)
            args = {"city": r.choice(_CITIES)} if name == "get_weather" else {"path": f"/tmp/{r.choice(_WORDS)}.txt"}
            out.append(f"functions.{name}:{r.randint(0, 3)}" + json.dumps(args) + "\n")
            out.append(f"## Return of functions.{name}:{r.randint(0, 3)}\n" + json.dumps({"result": r.randint(0, 999)}))
        elif k == 3:
            out.append(r.choice(_CODE))
        elif k == 4:
            out.append(f"{r.randint(0, 99999)} + {r.randint(0, 999)} = {r.random():.4f}; {r.choice(_CITIES)} {r.randint(1, 31)}C\n")
        else:
            s = r.randint(0, len(_ZH) - 6)
            out.append(_ZH[s : s + r.randint(2, 6)] + " user assistant system tool tool_declare\n")
    return out


# ---- whole checkpoints ------------------------------------------------------------------------
def _template_text(thinking: bool) -> str:
    name = "kimi_k2_thinking.jinja" if thinking else "kimi_k2_instruct.jinja"
    return (Path(__file__).parent / "chat" / name).read_text(encoding="utf-8")


def make_tiny_checkpoint(
    path: str | os.PathLike,
    preset: str = "nano",
    dtype: str = "float32",
    seed: int = 0,
    num_shards: int = 2,
    thinking: bool = False,
    n_merges: int | None = None,
    texts: list[str] | None = None,
    chat_template: bool = True,
    **overrides,
) -> Path:
    """Write a complete tiny K2 checkpoint to `path` and return it.

    `thinking` names `<think>`/`</think>` and ships K2-Thinking's template; `texts` trains the BPE
    on your own corpus (default: `tiny_corpus(seed)`); `overrides` replace config keys."""
    from k2mlx.tokenizer import save_tokenizer, train_bpe

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merges = n_merges if n_merges is not None else PRESETS[preset]["n_merges"]
    ranks = train_bpe(texts if texts is not None else tiny_corpus(seed), merges)
    cfg = k2_config(len(ranks), preset=preset, **overrides)
    cfg["torch_dtype"] = dtype
    save_tokenizer(path, ranks, thinking=thinking, chat_template=_template_text(thinking) if chat_template else None,
                   model_max_length=cfg["max_position_embeddings"])
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    base = len(ranks)
    gen = {"bos_token_id": base, "eos_token_id": base + 2, "do_sample": True,  # <|im_end|> ends a turn
           "temperature": 1.0 if thinking else 0.6, "max_length": cfg["max_position_embeddings"]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_weights(path, cfg, random_weights(cfg, seed), dtype=dtype, num_shards=num_shards)
    stamp = {"format": TINY_FORMAT_VERSION, "preset": preset, "dtype": dtype, "seed": seed, "thinking": thinking}
    (path / "k2mlx_tiny.json").write_text(json.dumps(stamp) + "\n")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("K2MLX_CACHE") or (Path.home() / ".cache" / "k2mlx"))


def embedded_model_path() -> Path:
    from k2mlx.loading.resolve import embedded_model_path as f

    return f()


def default_model_path() -> Path:
    """The embedded k2-nano (see k2mlx.loading.resolve.default_model_path): a missing asset is
    a CheckpointError, never a silent fallback to a random checkpoint built here."""
    from k2mlx.loading.resolve import default_model_path as f

    return f()
