"""Tensor parallelism (issue 16) over two real rank processes on loopback (MLX ring backend):
every rank holds half of every layer, rank 0 drives, and the float32 logits agree with one
process within 1e-5 (prefill and decode, batched cache operations), on tiny checkpoints with K2's
settings scaled down, with group-limited routing (n_group > 1) and at 4-bit."""
from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from test_dist_pipeline import PROMPTS, compare, reference


def launch_tp(ckpt, role, role_args, ranks=2, timeout=240):
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", ",".join(["127.0.0.1"] * ranks),
           "--model", str(ckpt), "--role", f"k2mlx.distributed.scenarios:{role}",
           "--role-args", json.dumps(role_args), "--parallel", "tensor"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"launcher failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def grouped_checkpoint(tmp_path_factory):
    """n_group > 1: the router picks expert groups first (K2 itself has n_group 1)."""
    from k2mlx.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("k2-grouped"), preset="nano", dtype="float32",
                                seed=1, n_group=4, topk_group=2)


@pytest.fixture(scope="module")
def q4_checkpoint(tmp_path_factory):
    """4-bit (group 32) with intermediate sizes whose halves fall on whole quantization groups."""
    from k2mlx.loading.convert import convert
    from k2mlx.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path_factory.mktemp("k2-wide"), preset="nano", dtype="float32", seed=2,
                               moe_intermediate_size=64, intermediate_size=128)
    return convert(src, tmp_path_factory.mktemp("k2-q4") / "q4", bits=4, group_size=32, dtype="float32",
                   progress=False).out


def _load(path):
    from k2mlx import load

    return load(str(path))[0]


@pytest.mark.parametrize("case", ["nano", "n_group", "q4", "nano-4-ranks"])
def test_tensor_logits_match_single_process(case, tiny_checkpoint, grouped_checkpoint, q4_checkpoint, tmp_path):
    """Two ranks (four for nano-4-ranks: the step passes round the ring, one head per rank)."""
    ckpt = {"nano": tiny_checkpoint, "n_group": grouped_checkpoint, "q4": q4_checkpoint,
            "nano-4-ranks": tiny_checkpoint}[case]
    args = {"prompts": PROMPTS[:2], "steps": 4}
    model = _load(ckpt)
    if case == "q4":  # really quantized: the split falls on packed words and group scales
        assert "scales" in model.layers[1].mlp.switch_mlp.down_proj and "scales" in model.layers[1].self_attn.o_proj
    reference(model, "greedy_logits", {**args, "out": str(tmp_path / "ref.npz")})
    launch_tp(ckpt, "greedy_logits", {**args, "out": str(tmp_path / "tp.npz")}, ranks=4 if "4-ranks" in case else 2)
    compare(tmp_path / "ref.npz", tmp_path / "tp.npz")
    ref = json.loads((tmp_path / "ref.npz.json").read_text())["tokens"]
    assert json.loads((tmp_path / "tp.npz.json").read_text())["tokens"] == ref


def test_tensor_cache_ops_reach_every_rank(tiny_checkpoint, tmp_path):
    """merge / filter / extend / deepcopy / trim on rank 0's caches are replayed on rank 1's."""
    reference(_load(tiny_checkpoint), "batched_cache_ops", {"prompts": PROMPTS, "out": str(tmp_path / "ref.npz")})
    launch_tp(tiny_checkpoint, "batched_cache_ops", {"prompts": PROMPTS, "out": str(tmp_path / "tp.npz")})
    compare(tmp_path / "ref.npz", tmp_path / "tp.npz")


def test_each_rank_holds_half_of_every_layer(tiny_checkpoint):
    """The shard arithmetic itself, in one process over a group of one stand-in per rank: the
    two halves' attention heads and expert slices add up to the whole layer's output."""
    from k2mlx.distributed import tensor

    full = _load(tiny_checkpoint)
    halves = [_load(tiny_checkpoint) for _ in range(2)]
    for r, m in enumerate(halves):
        tensor.shard_model(m, r, 2, group=None)
    layer = 1  # a MoE layer (first_k_dense_replace = 1)
    x = mx.random.normal((1, 3, full.args.hidden_size), key=mx.random.key(0))
    want = full.layers[layer].mlp(x)
    got = sum(m.layers[layer].mlp.inner(x) for m in halves)  # the partial sums all_sum adds
    assert float(mx.abs(want - got).max()) < 1e-5
    a = full.layers[layer].self_attn
    half = halves[0].layers[layer].self_attn
    assert half.num_heads * 2 == a.num_heads
    assert half.q_b_proj.weight.shape[0] * 2 == a.q_b_proj.weight.shape[0]
    assert half.kv_a_proj_with_mqa.weight.shape == a.kv_a_proj_with_mqa.weight.shape  # latent: replicated
    sw, hw = full.layers[layer].mlp.switch_mlp, halves[1].layers[layer].mlp.inner.switch_mlp
    assert hw.gate_proj.weight.shape[1] * 2 == sw.gate_proj.weight.shape[1]
    assert hw.down_proj.weight.shape[2] * 2 == sw.down_proj.weight.shape[2]
    assert halves[1].layers[layer].mlp.inner.gate.weight.shape == full.layers[layer].mlp.gate.weight.shape


# ---- the engine on rank 0 drives every rank ------------------------------------------------------
def _ref_engine(path, role, args, out):
    from k2mlx import load
    from k2mlx.distributed import scenarios

    model, tok = load(str(path))
    getattr(scenarios, role)(model, tok, **args, out=str(out))
    return json.loads(out.read_text())


def test_engine_greedy_text_identical_on_the_default_model(tmp_path):
    from k2mlx.tiny import default_model_path
    from k2mlx.tokenizer import load_tokenizer

    path = default_model_path()
    ban = list(load_tokenizer(path).eos_token_ids)
    args = {"prompts": PROMPTS + [[9, 8, 7, 6]], "max_tokens": 12, "ban": ban}
    ref = _ref_engine(path, "engine_texts", args, tmp_path / "ref.json")
    launch_tp(path, "engine_texts", {**args, "out": str(tmp_path / "tp.json")})
    got = json.loads((tmp_path / "tp.json").read_text())
    assert got["errors"] == [None] * 4 and got["groups"] == 1
    assert got["texts"] == ref["texts"] and all(len(t) > 0 for t in got["texts"])
    # both ranks ran every forward in lock step
    steps = {st["rank"]: len(st["steps"]) for st in got["timeline"]}
    assert steps[0] == steps[1] > 12


def test_engine_batching_cancel_and_prefix_cache_over_tensor(tiny_checkpoint, tmp_path):
    ref = _ref_engine(tiny_checkpoint, "engine_session", {}, tmp_path / "ref.json")
    launch_tp(tiny_checkpoint, "engine_session", {"out": str(tmp_path / "tp.json")})
    got = json.loads((tmp_path / "tp.json").read_text())
    assert got["texts"] == ref["texts"] and got["texts"][-1] == got["texts"][0]
    assert got["cached_tokens"] == ref["cached_tokens"] > 0


@pytest.mark.parametrize("victim,sig", [(1, "SIGKILL"), (0, "SIGKILL"), (1, "SIGSTOP"), (0, "SIGSTOP")])
def test_a_dead_or_frozen_rank_stops_every_rank(tiny_checkpoint, tmp_path, victim, sig):
    """Ranks wait inside all_sum under tensor parallelism: the heartbeat deadline must still end
    every rank within 10 s, naming the lost rank, with nothing left running."""
    import os
    import signal
    import threading
    import time

    from test_dist_faults import LIMIT_S, assert_all_gone, kill_groups

    state = tmp_path / "state.json"
    args = {"prompts": [[5, 6, 7]], "steps": 300, "hold_s": 0.1, "out": str(tmp_path / "o.npz")}
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", "127.0.0.1,127.0.0.1",
           "--model", str(tiny_checkpoint), "--role", "k2mlx.distributed.scenarios:greedy_logits",
           "--role-args", json.dumps(args), "--parallel", "tensor", "--deadline", "3.0", "--state", str(state)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines, decoding = [], threading.Event()

    def read(stream):
        for line in stream:
            lines.append(line)
            if "decode step 3" in line:
                decoding.set()

    for s in (proc.stdout, proc.stderr):
        threading.Thread(target=read, args=(s,), daemon=True).start()
    pids = []
    try:
        assert decoding.wait(120), "".join(lines)
        pids = [r["pid"] for r in json.loads(state.read_text())["ranks"]]
        t0 = time.monotonic()
        os.kill(pids[victim], getattr(signal, sig))
        rc = proc.wait(timeout=LIMIT_S + 5)
        dt = time.monotonic() - t0
        time.sleep(0.2)
        text = "".join(lines)
        assert rc == 3 and dt < LIMIT_S, f"rc {rc} after {dt:.1f} s\n{text}"
        assert f"rank {victim}, host 127.0.0.1" in text, text
        assert_all_gone(pids, within=1.0)
    finally:
        kill_groups([proc.pid] + pids)


def test_plan_shows_per_rank_memory_under_tensor():
    """K2's own config: each of two hosts holds half of every layer plus the replicated parts
    (embedding, head, MLA latent projections, router): a little over half of the weights."""
    import os

    cfg = os.path.join(os.path.dirname(__file__), "..", "fixtures", "kimi-k2-config.json")
    run = lambda *a: subprocess.run([sys.executable, "-m", "k2mlx.cli", "plan", "--model", cfg, "--memory",
                                     "512,512", "--context", "32768", "--json", *a],
                                    capture_output=True, text=True, timeout=120)  # noqa: E731
    pp, tp = run(), run("--parallel", "tensor")
    assert pp.returncode == 0 and tp.returncode == 0, pp.stderr + tp.stderr
    pp, tp = json.loads(pp.stdout), json.loads(tp.stdout)
    total = pp["weight_bytes"]
    per = [h["weight_bytes"] for h in tp["hosts"]]
    assert tp["parallel"] == "tensor" and per[0] == per[1]
    replicated = pp["embed_bytes"] + pp["head_bytes"]
    assert total / 2 + replicated / 2 < per[0] < total / 2 * 1.01 + replicated
    # the latent cache is replicated: every rank reserves the whole context
    assert tp["hosts"][0]["kv_bytes"] == pp["kv_bytes"] == sum(h["kv_bytes"] for h in pp["hosts"])


def test_each_rank_reads_only_its_slices(tmp_path):
    """A ~1 GB float32 checkpoint: a rank's peak RSS right after load (slices read straight
    from the safetensors files) is under 0.7x the one-process peak RSS after load."""
    from k2mlx.tiny import make_tiny_checkpoint

    # 0.8 GB: large enough that the process itself (about 40 MB of imports) does not decide it
    ckpt = make_tiny_checkpoint(tmp_path / "wide", preset="small", dtype="float32", seed=0, num_hidden_layers=8,
                                hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048,
                                n_routed_experts=16, num_experts_per_tok=4)
    assert_ranks_under(ckpt, tmp_path, 0.7)


def assert_ranks_under(ckpt, tmp_path, ratio: float) -> None:
    """Each of two tensor ranks' peak RSS after load < `ratio` x one process's after load. Peaks
    are VmHWM (`health.peak_rss`): a child's ru_maxrss would count pytest's own peak, inherited
    across fork + exec, and let this pass for free. The one process runs `load_model`, the
    loading a rank does: `load` also imports mlx-lm, whose transformers import pulls in torch
    where it is installed (250 MB here), which would let this pass for free too."""
    single = subprocess.run([sys.executable, "-c", "import sys; from k2mlx.loading import load_model; "
                             "from k2mlx.distributed.health import memory_info; load_model(sys.argv[1]); "
                             "print(memory_info()['peak_rss'])", str(ckpt)],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    one = int(single.stdout.split()[-1])
    launch_tp(ckpt, "memory_report", {"out": str(tmp_path / "mem.json")})
    ranks = json.loads((tmp_path / "mem.json").read_text())["peak_rss"]
    assert len(ranks) == 2 and all(ranks)
    print(f"peak RSS: ranks {[round(r / 1e6) for r in ranks]} MB, one process {one / 1e6:.0f} MB")
    assert max(ranks) < ratio * one, f"ranks {[r / 1e6 for r in ranks]} MB vs one process {one / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    """K2-Thinking-style compressed-tensors INT4 routed experts (packed int32 codes, bf16 group
    scales, the logical shape), written from a float nano checkpoint; the rest stays float."""
    import shutil

    from k2mlx.loading.formats import compressed_tensors as ct
    from k2mlx.loading.formats.writer import to_numpy, write_safetensors
    from k2mlx.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path_factory.mktemp("k2-wide-f"), preset="nano", dtype="float32", seed=3,
                               moe_intermediate_size=64, intermediate_size=128)
    dst = tmp_path_factory.mktemp("k2-int4") / "int4"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weight_map = {}
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        for name, w in mx.load(str(f)).items():
            if ".mlp.experts." in name and name.endswith(".weight"):
                rows, cols = w.shape
                amax = mx.abs(w).reshape(rows, cols // 32, 32).max(-1)
                scale = (amax / 7).astype(mx.bfloat16)
                codes = mx.clip(mx.round(w.reshape(rows, cols // 32, 32) / scale[..., None].astype(mx.float32)), -8, 7)
                base = name[: -len(".weight")]
                out[base + ".weight_packed"] = (ct.pack_numpy(np.array(codes.reshape(rows, cols)).astype(np.int64)), "I32")
                out[base + ".weight_scale"] = to_numpy(scale)
                out[base + ".weight_shape"] = (np.array([rows, cols], np.int64), "I64")
            else:
                out[name] = to_numpy(w)
        write_safetensors(dst / f.name, out)
        weight_map.update({k: f.name for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "group_size": 32, "symmetric": True, "strategy": "group", "type": "int",
            "dynamic": False}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def test_int4_compressed_tensors_read_in_slices_match_single_process(int4_checkpoint, tmp_path):
    from k2mlx.distributed.slices import load_shard

    model = _load(int4_checkpoint)  # the loader's own INT4 path, whole, in one process
    assert "scales" in model.layers[1].mlp.switch_mlp.down_proj
    half, _ = load_shard(int4_checkpoint, 1, 2, None)  # sliced straight from the packed words
    assert half.layers[1].mlp.inner.switch_mlp.down_proj["weight"].shape[-1] * 2 == \
        model.layers[1].mlp.switch_mlp.down_proj["weight"].shape[-1]
    args = {"prompts": PROMPTS[:2], "steps": 4}
    reference(model, "greedy_logits", {**args, "out": str(tmp_path / "ref.npz")})
    launch_tp(int4_checkpoint, "greedy_logits", {**args, "out": str(tmp_path / "tp.npz")})
    compare(tmp_path / "ref.npz", tmp_path / "tp.npz")
