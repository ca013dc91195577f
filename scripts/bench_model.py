#!/usr/bin/env python
"""Model-core benchmark: k2mlx vs mlx-lm's own deepseek_v3 on the same 4-bit K2-shaped
checkpoint, in one run: prefill tokens/s (one 512-token prompt), decode tokens/s, peak memory.

The checkpoint (random weights, MLX 4-bit group 64, K2 layout with stacked experts and a
quantized kv_b_proj that mlx-lm re-splits in its own sanitize) is written once to a cache
folder and reused. Both are timed the same way (synchronous evaluation, greedy decode): peak
memory with one model in memory at a time, then speed with all loaded and their steps
interleaved, so a noisy shared machine slows each alike.

    python scripts/bench_model.py                 # the issue's shape (memory-bound on a Mac)
    python scripts/bench_model.py --preset cpu    # scaled down for the Linux CPU build
    python scripts/bench_model.py --writer mlx-lm # the checkpoint written by mlx-lm's own code

With `--writer mlx-lm` the checkpoint is what a current mlx-lm conversion holds: mlx-lm's own
model built from the same config, randomized, quantized with its quantize_model and saved with
its save_model (MLA as embed_q / unembed_out; scripts/mlx_lm_checkpoint.py), so both
implementations run the very same stored matrices.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

PRESETS = {
    # issue 2 item 7: hidden 2048, 8 layers, 128 experts of 512, top-8, one shared expert
    "full": dict(hidden_size=2048, num_hidden_layers=8, n_routed_experts=128, moe_intermediate_size=512,
                 num_experts_per_tok=8, intermediate_size=4096, num_attention_heads=16, q_lora_rank=512,
                 kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                 vocab_size=32768, torch_dtype="bfloat16"),
    # the same structure at about 1/8 of the weights, for MLX's slow 4-bit CPU kernels; float32
    # activations/scales because MLX's CPU backend emulates bfloat16 (about 5x slower)
    "cpu": dict(hidden_size=1024, num_hidden_layers=4, n_routed_experts=64, moe_intermediate_size=256,
                num_experts_per_tok=8, intermediate_size=2048, num_attention_heads=8, q_lora_rank=256,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                vocab_size=16384, torch_dtype="float32"),
}


def bench_config(shape: dict) -> dict:
    cfg = dict(
        model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
        num_key_value_heads=shape["num_attention_heads"], n_shared_experts=1,
        routed_scaling_factor=2.827, n_group=1, topk_group=1, topk_method="noaux_tc",
        scoring_func="sigmoid", norm_topk_prob=True, first_k_dense_replace=1, moe_layer_freq=1,
        hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=50000.0,
        rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096,
                          beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        attention_bias=False, tie_word_embeddings=False, num_nextn_predict_layers=0,
        bos_token_id=0, eos_token_id=1,
        quantization={"group_size": 64, "bits": 4},
    )
    cfg.update(shape)
    return cfg


def write_checkpoint(folder: Path, cfg: dict, seed: int = 0) -> None:
    """Random bf16 weights -> MLX 4-bit, one shard per layer, with an index."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from rich.progress import Progress

    from k2mlx.config import ModelArgs
    from k2mlx.model.k2 import Model

    args = ModelArgs.from_dict(cfg)
    dtype = getattr(mx, cfg["torch_dtype"])
    mx.random.seed(seed)
    model = Model(args)
    params = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            params.append((k, (1.0 + 0.1 * mx.random.normal(v.shape)).astype(dtype)))
        elif k.endswith("e_score_correction_bias"):
            params.append((k, 0.01 * mx.random.normal(v.shape)))
        else:
            params.append((k, (mx.random.normal(v.shape) / math.sqrt(v.shape[-1])).astype(dtype)))
    model.load_weights(params)
    nn.quantize(model, group_size=64, bits=4)
    folder.mkdir(parents=True, exist_ok=True)
    flat = dict(tree_flatten(model.parameters()))
    groups: dict[str, dict] = {}
    for k, v in flat.items():
        part = k.split(".")[2] if k.startswith("model.layers.") else "other"
        groups.setdefault(part, {})[k] = v
    weight_map = {}
    with Progress(transient=True) as bar:
        task = bar.add_task("writing the benchmark checkpoint", total=len(groups))
        for i, (part, tensors) in enumerate(sorted(groups.items())):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            mx.eval(tensors)
            mx.save_safetensors(str(folder / name), tensors)
            weight_map.update({k: name for k in tensors})
            bar.advance(task)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


class Impl:
    """One implementation under test: "k2mlx[:moe_path]" or "mlx-lm"."""

    def __init__(self, name: str, folder: Path):
        import mlx.core as mx

        self.name = name
        self.moe_path = name.partition(":")[2] or "auto"
        if name.startswith("k2mlx"):
            from k2mlx.loading import load_model

            # the MoE path is decided once at load (k2mlx.kernels.policy), one model per variant
            self.model = load_model(folder, moe_path=self.moe_path)
            self.make_cache = self.model.make_cache
        elif name == "mlx-lm":
            from mlx_lm.models.cache import make_prompt_cache
            from mlx_lm.utils import load_model

            self.model, _ = load_model(folder)
            self.make_cache = lambda: make_prompt_cache(self.model)
        else:
            raise SystemExit(f"unknown implementation {name!r}")
        mx.eval(self.model.parameters())

    def __call__(self, tokens, cache):
        import mlx.core as mx

        tok = mx.argmax(self.model(tokens, cache)[:, -1], axis=-1)
        mx.eval(tok)
        return tok


def measure_memory(name: str, folder: Path, prompt, n_decode: int) -> dict:
    """Peak memory of one prefill + decode with only this implementation loaded."""
    import mlx.core as mx

    impl = Impl(name, folder)
    weights = mx.get_active_memory()
    for n in (2, n_decode):  # the first pass is a warm-up (kernel set-up / JIT)
        mx.reset_peak_memory()
        cache = impl.make_cache()
        tok = impl(prompt, cache)
        for _ in range(n):
            tok = impl(tok[:, None], cache)
    peak = mx.get_peak_memory()
    del impl, cache
    gc.collect()
    mx.clear_cache()
    return dict(peak_gb=peak / 1e9, weights_gb=weights / 1e9)


def measure_speed(impls: list, prompt, n_decode: int, rounds: int, clock) -> dict:
    """Interleaved timing, so a noisy (shared) machine slows every implementation alike:
    prefill alternates between implementations each round (best round kept); decode runs
    one step of each implementation in turn (all steps summed)."""
    out = {i.name: dict(prefill_s=float("inf"), decode_s=0.0, tokens=[]) for i in impls}
    caches = {}
    for r in range(rounds + 1):  # round 0 is a warm-up
        for impl in impls if r % 2 else impls[::-1]:
            cache = impl.make_cache()
            t0 = clock()
            tok = impl(prompt, cache)
            dt = clock() - t0
            if r:
                out[impl.name]["prefill_s"] = min(out[impl.name]["prefill_s"], dt)
            caches[impl.name] = (cache, tok)
    for impl in impls:
        out[impl.name]["tokens"].append(int(caches[impl.name][1].item()))
    for step in range(n_decode):
        for impl in impls if step % 2 else impls[::-1]:
            cache, tok = caches[impl.name]
            t0 = clock()
            tok = impl(tok[:, None], cache)
            out[impl.name]["decode_s"] += clock() - t0
            caches[impl.name] = (cache, tok)
            out[impl.name]["tokens"].append(int(tok.item()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens")
    ap.add_argument("--rounds", type=int, default=2, help="timed prefill rounds (best is kept)")
    ap.add_argument("--cache-dir", default=os.environ.get(
        "K2MLX_BENCH_DIR", str(Path.home() / ".cache" / "k2mlx" / "bench")))
    ap.add_argument("--writer", choices=("k2mlx", "mlx-lm"), default="k2mlx",
                    help="who writes the checkpoint: k2mlx (kv_b_proj layout) or mlx-lm's own save_model "
                         "(embed_q/unembed_out)")
    ap.add_argument("--impls", default="k2mlx,mlx-lm",
                    help="comma list of k2mlx[:moe_path] and mlx-lm; moe_path = auto (default), "
                         "switch, reference or kernel (k2mlx.kernels' expert dispatch)")
    a = ap.parse_args(argv)

    import mlx.core as mx

    cfg = bench_config(PRESETS[a.preset])
    folder = Path(a.cache_dir).expanduser() / (f"k2-{a.preset}-q4" + ("-mlx-lm" if a.writer == "mlx-lm" else ""))
    if not (folder / "config.json").exists():
        print(f"writing checkpoint to {folder} ...", file=sys.stderr)
        if a.writer == "mlx-lm":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from mlx_lm_checkpoint import write_mlx_lm_checkpoint

            plain = {k: v for k, v in cfg.items() if k != "quantization"}
            write_mlx_lm_checkpoint(folder, plain, bits=4, group_size=64, dtype=cfg["torch_dtype"])
        else:
            write_checkpoint(folder, cfg)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    print(f"checkpoint {folder} ({size:.2f} GB, 4-bit g64, written by {a.writer}), preset {a.preset}: "
          + ", ".join(f"{k}={v}" for k, v in PRESETS[a.preset].items()))
    # On the CPU backend the machine may be shared: time with this process's CPU time (all
    # its threads), which other processes barely inflate. On a GPU: wall-clock time.
    on_cpu = mx.default_device() == mx.cpu
    clock = time.process_time if on_cpu else time.perf_counter
    print(f"device {mx.default_device()}, mlx {mx.__version__}; prompt {a.prompt}, decode {a.decode}; "
          f"rates from {'process CPU' if on_cpu else 'wall-clock'} time")
    prompt = mx.random.randint(2, cfg["vocab_size"], (1, a.prompt), key=mx.random.key(7))

    names = [i.strip() for i in a.impls.split(",") if i.strip()]
    results: dict[str, dict] = {}
    for name in names:  # memory: one implementation in memory at a time
        try:
            results[name] = measure_memory(name, folder, prompt, a.decode)
            print(f"  memory {name:14s}: peak {results[name]['peak_gb']:.3f} GB "
                  f"(weights {results[name]['weights_gb']:.3f} GB)")
        except RuntimeError as e:  # e.g. a kernel the backend lacks: report, go on
            print(f"  memory {name:14s}: FAILED: {str(e).splitlines()[0][:160]}")
            e.__traceback__ = None  # drop the frames holding that model's weights
            gc.collect()
            mx.clear_cache()
    impls = [Impl(name, folder) for name in results]  # speed: all loaded, interleaved
    speed = measure_speed(impls, prompt, a.decode, a.rounds, clock)
    for name, sp in speed.items():
        results[name].update(prefill_tps=a.prompt / sp["prefill_s"], decode_tps=a.decode / sp["decode_s"],
                             tokens=sp["tokens"])

    print()
    print("| impl | prefill tok/s | decode tok/s | peak memory GB | weights GB |")
    print("|---|---:|---:|---:|---:|")
    for name, b in results.items():
        print(f"| {name} | {b['prefill_tps']:.1f} | {b['decode_tps']:.2f} | {b['peak_gb']:.3f} | "
              f"{b['weights_gb']:.3f} |")
    if "mlx-lm" in results:
        m = results["mlx-lm"]
        for name, k in results.items():
            if name == "mlx-lm":
                continue
            same = sum(x == y for x, y in zip(k["tokens"], m["tokens"]))
            print(f"{name} / mlx-lm: prefill {k['prefill_tps'] / m['prefill_tps']:.2f}x, "
                  f"decode {k['decode_tps'] / m['decode_tps']:.2f}x, "
                  f"peak memory {k['peak_gb'] / m['peak_gb']:.2f}x; "
                  f"greedy tokens equal {same}/{len(k['tokens'])}")
        if a.writer == "k2mlx":
            print("(mlx-lm dequantizes kv_b_proj and re-quantizes it along another axis, so on random "
                  "weights its tokens drift from k2mlx's, which uses the checkpoint's own codes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
