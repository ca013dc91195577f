"""Train k2-nano: the exact K2 architecture at toy size, on the synthetic tool-use conversations.

Pipeline (all from one seed): generate conversations -> render them with the project's chat
template -> train a byte-level BPE in the Kimi tiktoken format (K2 special tokens) -> tokenize with
a loss mask covering only the assistant's turns -> train float32 with MuonClip -> (the script)
quantize to 4-bit and write the HF-layout checkpoint.

On Linux, float32 training needs OpenBLAS preloaded (see docs/NANO.md); MLX's bundled reference
BLAS is ~50x slower.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from k2mlx.nano.data import Conversation, generate
from k2mlx.nano.muon import MuonClip, attention_max_logits, qk_clip_layer

# The architecture: every K2 feature at toy width (MLA with q/kv low rank, YaRN on the rope dims,
# sigmoid-routed MoE with noaux_tc bias, one shared expert, a dense first layer, untied lm_head).
NANO_ARCH = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "hidden_size": 192,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "float32",
}


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2200
    batch_size: int = 8
    # Muon's updates are scaled to AdamW's RMS (0.2 * sqrt(max(n, m))), so one lr serves both
    lr: float = 6e-3
    adam_lr_ratio: float = 1.0
    warmup: int = 40
    weight_decay: float = 0.01
    tau: float = 100.0  # QK-clip threshold (K2 used 100)
    clip_every: int = 8  # the clip pass is a full extra forward; logits stay far below tau here
    clip_rows: int = 4  # sequences of the step's batch the clip pass measures
    n_conversations: int = 12000
    n_merges: int = 1000
    tokenizer_sample: int = 3000
    max_len: int = 1024
    mix: dict | None = None  # kind -> weight overrides of Generator.KINDS (a later stage's emphasis)
    arch: dict = field(default_factory=lambda: dict(NANO_ARCH))


# -- rendering and tokenizing ---------------------------------------------------------------------

def instruct_template() -> str:
    """K2-Instruct's chat template as shipped in k2mlx (k2-nano carries it as chat_template.jinja,
    so training renders exactly what the server will render)."""
    return (Path(__file__).parents[1] / "chat" / "kimi_k2_instruct.jinja").read_text(encoding="utf-8")


def _render(messages, tools, add_generation_prompt: bool, template: str | None) -> str:
    from k2mlx.chat.template import render

    return render(messages, tools=tools, add_generation_prompt=add_generation_prompt, template=template)


def assistant_segments(conv: Conversation, template: str | None = None) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant) pieces. Each assistant turn is
    what follows the generation prompt rendered before it, through its <|im_end|>."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(conv.messages[:i], conv.tools, True, template)
        full = _render(conv.messages[: i + 1], conv.tools, False, template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"chat template is not prefix-stable at message {i} ({conv.kind})")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>|\[(?:BOS|EOS|EOT|UNK|PAD)\]|</?think>")


_SPLIT_RE = re.compile(_SPECIAL_RE.pattern + r"|\d+")


def tokenizer_texts(convs: list[Conversation], template: str | None = None) -> list[str]:
    """Rendered text with the special-token strings and the digits cut out: special tokens never
    take part in merges, and numbers stay one token per digit. Digit tokens are seen thousands of
    times, so the model learns to copy any number early; with BPE number tokens ("677") most
    numbers are rare tokens whose embeddings barely train, and copying them fails."""
    out = []
    for c in convs:
        out += [p for p in _SPLIT_RE.split(_render(c.messages, c.tools, False, template)) if p]
    return out


def encode_conversation(conv: Conversation, tok, template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 on assistant tokens). Pieces meet at special tokens, so
    encoding them one by one gives the same ids as encoding the whole text."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in assistant_segments(conv, template):
        t = tok.encode(text, allow_special=True)
        ids += t
        mask += [int(is_assistant)] * len(t)
    return ids, mask


# -- MuonClip side work: per-head max logits and router balance ------------------------------------

def clip_and_balance(model, x: mx.array, opt: MuonClip) -> dict:
    """One no-grad pass over the layers with the step's batch: the largest pre-softmax logit of
    every head (QK-clip rescales the heads above tau) and each MoE layer's expert load (the
    aux-loss-free bias step). Returns stats for the log."""
    from k2mlx.mlxlm_adapter import create_attention_mask

    h = model.embed(x)
    mask = create_attention_mask(h, None, return_array=True)
    max_logit, clipped = 0.0, 0
    for layer in model.layers:
        a_in = layer.input_layernorm(h)
        logits = attention_max_logits(layer.self_attn, a_in)  # [H]
        h = h + layer.self_attn(a_in, mask, None)
        m_in = layer.post_attention_layernorm(h)
        gate = getattr(layer.mlp, "gate", None)
        load = None
        if gate is not None:
            inds, _ = gate(m_in)  # [B, L, k]
            E = gate.weight.shape[0]
            load = (mx.expand_dims(inds.reshape(-1), 1) == mx.arange(E)).sum(0)  # [E]
        h = h + layer.mlp(m_in)
        mx.eval(logits, h, *( [load] if load is not None else []))
        top = float(logits.max())
        max_logit = max(max_logit, top)
        if top > opt.tau:
            gamma = qk_clip_layer(layer.self_attn, logits, opt.tau)
            clipped += int((gamma < 1).sum())
        if load is not None:
            # K2 / DeepSeek-V3 aux-loss-free balancing: raise the bias of under-used experts
            err = load.astype(mx.float32).mean() - load.astype(mx.float32)  # [E]
            gate.e_score_correction_bias = gate.e_score_correction_bias + opt.bias_update_speed * mx.sign(err)
    return {"max_logit": max_logit, "clipped_heads": clipped}


# -- the training run ---------------------------------------------------------------------------

def lr_schedule(cfg: TrainConfig):
    """Linear warmup, then cosine down to 10%."""
    def lr(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
    return lr


def init_model(args, seed: int):
    """The project's Model with seeded weights; the router (zeros in a fresh Model, as it waits
    for a checkpoint) gets small random weights so experts differ from the first step."""
    from k2mlx.model.k2 import Model

    mx.random.seed(seed)
    model = Model(args)
    for layer in model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            gate.weight = mx.random.normal(gate.weight.shape) * 0.02  # [E, hidden]
    # The embedding's default N(0, 1) init is far larger than the linears': scale it down so the
    # residual stream starts in the range the RMSNorms expect.
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 0.1
    mx.eval(model.parameters())
    return model


def is_quantized(model) -> bool:
    return any(hasattr(m, "scales") for _, m in model.named_modules())


def dequantized(qmodel):
    """A float32 Model holding exactly the values the quantized one computes with: every
    quantized module's codes dequantized (mx.dequantize with its own bits, group size and mode),
    float tensors (norms, router, correction bias) copied. Continuing training from it starts at
    the shipped model's behaviour. (Quantizing it again does not give back every code: a group
    whose codes do not span 0..2^bits-1 gets a new scale, so 4-bit agreement is measured anew.)"""
    import dataclasses

    from mlx.utils import tree_flatten

    from k2mlx.model.k2 import Model

    args = dataclasses.replace(qmodel.args, quantization=None, quantization_config=None)
    model = Model(args)
    modules = dict(qmodel.named_modules())
    params = dict(tree_flatten(qmodel.parameters()))
    weights = []
    for name, v in params.items():
        prefix, _, leaf = name.rpartition(".")
        m = modules.get(prefix)
        if m is not None and hasattr(m, "scales"):
            if leaf != "weight":
                continue  # scales / biases are folded into the dequantized weight
            v = mx.dequantize(v, m.scales, getattr(m, "biases", None), group_size=m.group_size, bits=m.bits,
                              mode=getattr(m, "mode", "affine"))
        weights.append((name, v.astype(mx.float32)))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def masked_loss(model, x, y, sel, w):
    """Cross entropy on the assistant tokens only: `sel` indexes the flattened [B*L] positions
    that carry loss (padded with weight-0 entries), so lm_head runs on those rows alone."""
    h = model.forward_layers(model.embed(x))  # [B, L, hidden]
    h = h.reshape(-1, h.shape[-1])[sel]  # [N, hidden]
    logits = model.head(h).astype(mx.float32)  # [N, vocab]
    ce = nn.losses.cross_entropy(logits, y.reshape(-1)[sel], reduction="none")  # [N]
    return (ce * w).sum() / mx.maximum(w.sum(), 1)


class Batches:
    """Seeded batches of similar length (shorter padding: attention cost grows with L^2)."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], batch_size: int, seed: int, pad_id: int):
        self.data = encoded
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.pad_id = pad_id
        self.order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")

    def next(self):
        n, B = len(self.data), self.batch_size
        # a random window of the length-sorted list, then a random batch from it
        start = int(self.rng.integers(0, max(1, n - 4 * B)))
        idx = self.rng.choice(self.order[start : start + 4 * B], B, replace=False)
        seqs = [self.data[i] for i in idx]
        L = int(math.ceil((max(len(s[0]) for s in seqs) - 1) / 16) * 16)
        x = np.full((B, L), self.pad_id, np.int32)
        y = np.full((B, L), self.pad_id, np.int32)
        m = np.zeros((B, L), np.float32)
        for b, (ids, mask) in enumerate(seqs):
            k = len(ids) - 1
            x[b, :k], y[b, :k], m[b, :k] = ids[:-1], ids[1:], mask[1:]
        sel = np.flatnonzero(m.reshape(-1))
        N = int(math.ceil(len(sel) / 64) * 64)
        w = np.zeros(N, np.float32)
        w[: len(sel)] = 1
        sel = np.concatenate([sel, np.zeros(N - len(sel), sel.dtype)]).astype(np.int32)
        return mx.array(x), mx.array(y), mx.array(sel), mx.array(w), int(m.sum())


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    args: object
    config_dict: dict
    losses: list[float]
    max_logits: list[float]
    seconds: float
    tokens_seen: int
    assistant_tokens_seen: int


def prepare(cfg: TrainConfig, tok_dir: Path, template: str | None = None):
    """Conversations -> tokenizer (written to `tok_dir`) -> encoded (ids, mask) pairs."""
    from k2mlx.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    convs = generate(cfg.n_conversations, cfg.seed, weights=cfg.mix)
    ranks = train_bpe(tokenizer_texts(convs[: cfg.tokenizer_sample], template), cfg.n_merges)
    save_tokenizer(tok_dir, ranks, thinking=False, chat_template=template,
                   model_max_length=cfg.arch["max_position_embeddings"])
    tok = load_tokenizer(tok_dir)
    encoded = [encode_conversation(c, tok, template) for c in convs]
    encoded = [e for e in encoded if len(e[0]) <= cfg.max_len]
    return tok, encoded


def train(cfg: TrainConfig, tok_dir: Path, template: str | None = None, progress: bool = True,
          log=None, init_from: str | Path | None = None) -> TrainResult:
    """Train from scratch, or with `init_from` (a float k2-nano checkpoint) continue from its
    weights and tokenizer on fresh conversations drawn from `cfg.seed`."""
    from k2mlx.config import ModelArgs

    if init_from is None:
        tok, encoded = prepare(cfg, Path(tok_dir), template)
        config = dict(cfg.arch)
        config["vocab_size"] = tok.vocab_size
        config["bos_token_id"], config["eos_token_id"] = tok.bos_token_id, tok.eos_token_id
        args = ModelArgs.from_dict(config)
        model = init_model(args, cfg.seed)
    else:
        import json
        import shutil

        from k2mlx import load

        model, tok = load(init_from)
        if is_quantized(model):  # the shipped 4-bit asset: continue from its exact float values
            model = dequantized(model)
        model.train()
        args = model.args
        config = {k: v for k, v in json.loads((Path(init_from) / "config.json").read_text()).items()
                  if k not in ("torch_dtype", "quantization", "quantization_config")}
        Path(tok_dir).mkdir(parents=True, exist_ok=True)
        for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
            if (Path(init_from) / f).is_file():
                shutil.copy2(Path(init_from) / f, Path(tok_dir) / f)
        encoded = [encode_conversation(c, tok, template)
                   for c in generate(cfg.n_conversations, cfg.seed, weights=cfg.mix)]
        encoded = [e for e in encoded if len(e[0]) <= cfg.max_len]
    opt = MuonClip(lr=lr_schedule(cfg), weight_decay=cfg.weight_decay, adam_lr_ratio=cfg.adam_lr_ratio,
                   tau=cfg.tau)
    batches = Batches(encoded, cfg.batch_size, cfg.seed + 1, tok.pad_token_id or 0)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    losses, max_logits, tokens, atokens = [], [], 0, 0
    t0 = time.perf_counter()
    bar = _progress(progress)
    task = bar.add_task("training k2-nano", total=cfg.steps) if bar else None
    with bar if bar else _null():
        for step in range(cfg.steps):
            x, y, sel, w, n_assist = batches.next()
            loss, grads = loss_and_grad(model, x, y, sel, w)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.arrays())
            stats = clip_and_balance(model, x[: cfg.clip_rows], opt) if step % cfg.clip_every == 0 else {}
            losses.append(float(loss))
            max_logits.append(stats.get("max_logit", float("nan")))
            tokens += x.size
            atokens += n_assist
            if bar:
                bar.update(task, advance=1, description=f"training k2-nano  loss {losses[-1]:.3f}")
            if log:
                log(step, losses[-1], stats)
    return TrainResult(model, tok, args, config, losses, max_logits, time.perf_counter() - t0, tokens, atokens)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
