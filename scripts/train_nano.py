#!/usr/bin/env python
"""Train k2-nano from scratch and write the embedded model `k2mlx/assets/k2-nano/`.

    apt-get install -y libopenblas0-pthread     # Linux: MLX's bundled BLAS is ~50x slower
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/train_nano.py

Steps: synthetic conversations (seeded) -> BPE tokenizer in Kimi's tiktoken format -> float32
training of the K2 architecture with MuonClip -> float checkpoint in the HF K2 layout ->
`k2mlx convert` to 4-bit -> checks (4-bit vs float greedy agreement, arithmetic tool-call scores)
-> TRAINING.json (script, seed, steps, loss curve, timings, scores) beside the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from k2mlx.nano.train import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--conversations", type=int, default=d.n_conversations)
    p.add_argument("--out", default=str(ROOT / "k2mlx" / "assets" / "k2-nano"), help="4-bit model folder")
    p.add_argument("--work", default=str(ROOT / "build" / "k2-nano"), help="tokenizer + float checkpoint")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--eval-cases", type=int, default=60)
    p.add_argument("--plot", default=str(ROOT / "docs" / "nano_loss.png"), help="loss curve PNG ('' to skip)")
    p.add_argument("--class-bits", default=None,
                   help='JSON bits per module class, e.g. \'{"attention": 8}\' (experts, shared, attention, dense, embed, head)')
    p.add_argument("--init-from", default=None,
                   help="continue from this k2-nano checkpoint (its weights and tokenizer) instead of from scratch: "
                        "a float one, or a quantized one such as the shipped k2mlx/assets/k2-nano, dequantized "
                        "to float32 first (copy it elsewhere: --out is rewritten)")
    p.add_argument("--mix", default=None, metavar="KIND=W,...",
                   help="override conversation kind weights, e.g. refusal=30 (defaults: k2mlx.nano.data.Generator.KINDS)")
    p.add_argument("--requantize", action="store_true",
                   help="skip training: quantize WORK/float again (other --bits/--class-bits) and redo the checks")
    args = p.parse_args(argv)
    class_bits = json.loads(args.class_bits) if args.class_bits else None

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from k2mlx.nano.evaluate import greedy_agreement, score_in_process
    from k2mlx.nano.export import folder_bytes, quantize_checkpoint, write_float_checkpoint
    from k2mlx.nano.train import instruct_template, train

    if platform.system() == "Linux" and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        print("note: MLX's bundled BLAS is ~50x slower than OpenBLAS for float32 training; see the docstring",
              file=sys.stderr)
    work, out = Path(args.work), Path(args.out)
    float_dir = work / "float"
    t0 = time.perf_counter()
    if args.requantize:
        record = json.loads((out / "TRAINING.json").read_text())
        record.pop("greedy_agreement_4bit_vs_float", None)  # written by an earlier version of this script
    else:
        mix = parse_mix(args.mix) if args.mix else None
        cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          n_conversations=args.conversations, mix=mix)
        work.mkdir(parents=True, exist_ok=True)
        tty = sys.stderr.isatty()

        def log(step, loss, stats):  # a plain log line when there is no terminal for the progress bar
            if not tty and (step % 25 == 0 or step == cfg.steps - 1):
                print(f"step {step} loss {loss:.4f} {stats} {time.perf_counter() - t0:.0f}s", flush=True)

        prior = None
        if args.init_from:  # keep the earlier stage's record (its copy in the float folder)
            src = Path(args.init_from)
            prior = json.loads((src / "TRAINING.json").read_text()) if (src / "TRAINING.json").is_file() else None
            if src.resolve() in (float_dir.resolve(), out.resolve()):
                raise SystemExit("--init-from must not be WORK/float or --out (they are rewritten); copy it elsewhere first")
        result = train(cfg, work / "tokenizer", template=instruct_template(), progress=tty, log=log,
                       init_from=args.init_from)
        print(f"trained {cfg.steps} steps in {result.seconds:.0f} s; final loss "
              f"{sum(result.losses[-20:]) / 20:.4f} (mean of the last 20)")
        write_float_checkpoint(result.model, result.config_dict, work / "tokenizer", float_dir)
        record = {
            "script": "scripts/train_nano.py",
            "command": "python scripts/train_nano.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": cfg.seed,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "conversations": cfg.n_conversations,
            "optimizer": f"MuonClip (Muon + per-head QK-clip, tau {cfg.tau:.0f}, measured every "
                         f"{cfg.clip_every} steps; AdamW for embeddings/norms/router/lm_head)",
            "train_seconds": round(result.seconds, 1),
            "tokens_seen": result.tokens_seen,
            "assistant_tokens_seen": result.assistant_tokens_seen,
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, mlx {mx.__version__}, "
                       f"load average at the end {os.getloadavg()[0]:.1f}",
            "losses": [round(x, 5) for x in result.losses],
            "max_logits": [None if x != x else round(x, 3) for x in result.max_logits],
        }
        if prior is not None:
            stage = {k: record[k] for k in ("command", "seed", "steps", "lr", "conversations", "train_seconds")}
            record["stages"] = prior.get("stages", [{k: prior[k] for k in stage if k in prior}]) + [stage]
            record["steps"] = prior["steps"] + cfg.steps
            record["train_seconds"] = round(prior["train_seconds"] + result.seconds, 1)
            record["losses"] = prior["losses"] + record["losses"]
            record["max_logits"] = prior["max_logits"] + record["max_logits"]
            record["tokens_seen"] += prior["tokens_seen"]
            record["assistant_tokens_seen"] += prior["assistant_tokens_seen"]
        (float_dir / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
        if args.plot:
            plot_losses(record["losses"], args.plot)

    quantize_checkpoint(float_dir, out, bits=args.bits, group_size=args.group_size, class_bits=class_bits)
    fmodel, tok = load_model(float_dir)
    qmodel, _ = load_model(out)
    agree = greedy_agreement(fmodel, qmodel, tok, n=args.eval_cases)
    print(f"{args.bits}-bit vs float greedy outputs identical on {agree['identical']}/{agree['prompts']} held-out prompts")
    scores_f = score_in_process(fmodel, tok, n=args.eval_cases)
    scores_q = score_in_process(qmodel, tok, n=args.eval_cases)
    print(f"in-process arithmetic (float): {scores_f}\nin-process arithmetic ({args.bits}-bit): {scores_q}")
    record.update({
        "quantization": {"bits": args.bits, "group_size": args.group_size, "class_bits": class_bits},
        "size_bytes": folder_bytes(out),
        "parameters": int(sum(v.size for _, v in tree_flatten(fmodel.parameters()))),
        "greedy_agreement_quantized_vs_float": {k: agree[k] for k in ("prompts", "identical", "rate")},
        "in_process_scores": {"float": scores_f, "quantized": scores_q},
    })
    (out / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({record['size_bytes'] / 1e6:.2f} MB)")
    return 0


def parse_mix(text: str) -> dict[str, float]:
    """'refusal=35,repeat=10' -> {'refusal': 35.0, 'repeat': 10.0}; unknown kinds are an error."""
    from k2mlx.nano.data import Generator

    kinds = dict(Generator.KINDS)
    out = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise SystemExit(f"--mix: '{item}' is not KIND=WEIGHT") from None
        if name.strip() not in kinds:
            raise SystemExit(f"--mix: unknown kind '{name.strip()}' (kinds: {', '.join(kinds)})")
    return out


def load_model(path):
    from k2mlx import load

    return load(path)


def plot_losses(losses: list[float], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot", file=sys.stderr)
        return
    import numpy as np

    y = np.array(losses)
    k = 20
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(y, color="#bbb", lw=0.8, label="per step")
    ax.plot(np.arange(k - 1, len(y)), smooth, color="#c33", lw=1.6, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on assistant tokens")
    ax.set_title("k2-nano training (MuonClip, float32, seed 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
