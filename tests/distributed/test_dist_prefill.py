"""Pipelined prefill (k2mlx/engine/prefill.py) over two real ranks on loopback: every logprob the
engine reports equals the single-process engine's (float32, within 1e-5), for prompts of 1, 2
and 7 chunks, a prefix-cache hit in the middle of a prompt, a long prompt joining a decoding
sequence and a request after a cancellation mid-prefill; and chunks really were in flight
together."""
from __future__ import annotations

import json

import numpy as np
from test_dist_pipeline import launch

CHUNK = 16


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, 300, size=n)]


ARGS = {"chunk": CHUNK, "prompts": [prompt(12, 1), prompt(30, 2), prompt(110, 3)], "shared": prompt(50, 4)}


def test_pipelined_prefill_matches_one_process(tiny_checkpoint, tiny_tokenizer, tmp_path):
    from k2mlx import load
    from k2mlx.distributed.scenarios import prefill_logprobs

    model, _ = load(str(tiny_checkpoint))
    prefill_logprobs(model, tiny_tokenizer, out=str(tmp_path / "ref.json"), **ARGS)
    ref = json.loads((tmp_path / "ref.json").read_text())
    launch(tiny_checkpoint, "prefill_logprobs", {**ARGS, "out": str(tmp_path / "pp.json")}, [[0, 2], [2, 4]],
           timeout=300)
    got = json.loads((tmp_path / "pp.json").read_text())
    assert got["hit_cached"] == ref["hit_cached"] and 16 <= got["hit_cached"] <= 50
    assert got["max_inflight"] >= 2, "no two prompt chunks were ever in flight together"
    keys = [k for k in ref if k not in ("hit_cached", "max_inflight")]
    assert len(keys) == 7
    for k in keys:
        a, b = ref[k], got[k]
        assert len(a) == len(b) == (39 if k == "runner" else 4), k  # runner: its first token was read before
        for (lp_a, top_a), (lp_b, top_b) in zip(a, b):
            assert abs(lp_a - lp_b) <= 1e-5, k
            assert np.max(np.abs(np.array(top_a) - np.array(top_b))) <= 1e-5, k


def test_generate_hosts_long_prompt_same_text(tiny_checkpoint, tmp_path):
    """`k2mlx generate --hosts` on a prompt of many chunks prints what one process prints."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "K2MLX_STATE_DIR": str(tmp_path)}
    text = " ".join(f"river {i} flows past the old mill and into the sea." for i in range(60))  # ~700 tokens
    common = [sys.executable, "-m", "k2mlx.cli", "generate", "--model", str(tiny_checkpoint), "--prompt", text,
              "--temp", "0", "--max-tokens", "16"]
    one = subprocess.run(common, capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run(common + ["--hosts", "127.0.0.1,127.0.0.1"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert one.stdout.strip() and two.stdout == one.stdout
