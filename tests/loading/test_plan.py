"""`plan` on the real K2 config: parameter counts, bytes and latent KV against a hand count,
memory-balanced splits for unequal hosts, the fit verdict and the JSON output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2mlx.cli import main as cli_main
from k2mlx.config import ModelArgs
from k2mlx.loading.plan import make_plan, measure, sizes_for, split_layers, usable_bytes

K2_CONFIG = Path(__file__).resolve().parents[1] / "fixtures" / "kimi-k2-config.json"

# Kimi K2 by hand (k2-reference.md)
H, L, V, I, IM, E, K = 7168, 61, 163840, 18432, 2048, 384, 8
HEADS, QR, KVR, NOPE, ROPE, VD = 64, 1536, 512, 128, 64, 128
ATTN_LINEAR = [(QR, H), (HEADS * (NOPE + ROPE), QR), (KVR + ROPE, H), (HEADS * (NOPE + VD), KVR), (H, HEADS * VD)]
ATTN_NORMS = QR + KVR  # q_a_layernorm, kv_a_layernorm
EXPERT = [(IM, H), (IM, H), (H, IM)]  # gate, up, down
DENSE = [(I, H), (I, H), (H, I)]
N_MOE = L - 1  # first_k_dense_replace = 1


def n(mats):
    return sum(o * i for o, i in mats)


def hand_params():
    attn = n(ATTN_LINEAR) + ATTN_NORMS + 2 * H  # + input/post-attention norms
    moe = E * n(EXPERT) + n(EXPERT) + E * H + E  # routed, shared, router weight, correction bias
    total = 2 * V * H + H + L * attn + n(DENSE) + N_MOE * moe
    active = total - N_MOE * (E - K) * n(EXPERT)
    return total, active


def hand_bytes_4bit_g64():
    q = lambda mats: sum(o * i // 2 + 2 * 2 * (o * i // 64) for o, i in mats)  # words + bf16 scales, biases
    attn = q(ATTN_LINEAR) + 2 * (ATTN_NORMS + 2 * H)
    moe = q(EXPERT) * (E + 1) + 2 * E * H + 4 * E  # router weight bf16, correction bias float32
    return q([(V, H)]) * 2 + 2 * H + L * attn + q(DENSE) + N_MOE * moe


@pytest.fixture(scope="module")
def k2_args():
    return ModelArgs.from_dict(json.loads(K2_CONFIG.read_text()))


def test_k2_counts_match_hand_count(k2_args):
    s = sizes_for(k2_args, bits=4, group_size=64)
    total, active = hand_params()
    assert s.total_params == total and s.active_params == active
    assert 1.0e12 < total < 1.05e12  # "about 1.04T" (1.026T counted exactly)
    assert 32e9 < active < 33.5e9  # "about 32B active"
    assert s.kv_bytes_per_token == (KVR + ROPE) * L * 2 == 70_272
    assert s.weight_bytes == hand_bytes_4bit_g64()
    assert s.layer_bytes[1] == s.layer_bytes[60] > 30 * s.layer_bytes[0]  # MoE layers dwarf the dense one


def test_measuring_k2_stays_lazy(k2_args):
    """Building and quantizing the 1T-parameter model for counting must not allocate it."""
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    before = rss()
    s = measure(k2_args, bits=3, group_size=128)
    assert s.weight_bytes > 350 * 2**30
    assert rss() - before < 1 * 2**30


def test_split_unequal_hosts(k2_args):
    ranges = split_layers(k2_args, [512, 256], bits=4, group_size=64, context=131072)
    assert ranges[0].start == 0 and ranges[0].stop == ranges[1].start and ranges[1].stop == 61
    big, small = len(ranges[0]), len(ranges[1])
    assert big > small and 1.6 < big / small < 2.4  # memory is 2:1, layers follow
    plan = make_plan(k2_args, [512, 256], bits=4, group_size=64, context=131072)
    loads = [h["bytes"] / usable_bytes(h["memory_gb"]) for h in plan["hosts"]]
    assert abs(loads[0] - loads[1]) < 0.05  # balanced by memory fraction, not by layer count
    # the other way round: the small host first
    r = split_layers(k2_args, [256, 512], bits=4, group_size=64)
    assert len(r[0]) < len(r[1])
    even = split_layers(k2_args, [512, 512, 512], bits=4, group_size=64)
    assert max(map(len, even)) - min(map(len, even)) <= 1


def test_plan_cli_json_and_verdict(capsys):
    assert cli_main(["plan", "--model", str(K2_CONFIG), "--memory", "512,256", "--context", "131072", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "weight_bytes", "kv_bytes_per_token", "hosts"):
        assert key in p
    assert p["kv_bytes_per_token"] == 70_272 and p["fits"]
    assert [h["layers"] for h in p["hosts"]][0][0] == 0 and p["hosts"][1]["layers"][1] == 60
    assert p["hosts"][0]["layers"][1] + 1 == p["hosts"][1]["layers"][0]
    assert all(h["bytes"] == h["weight_bytes"] + h["kv_bytes"] for h in p["hosts"])
    assert sum(h["weight_bytes"] for h in p["hosts"]) == p["weight_bytes"]
    # two 256 GB Macs cannot hold K2 at 4 bits (~538 GiB): the verdict says so, exit code 2
    rc = cli_main(["plan", "--model", str(K2_CONFIG), "--hosts", "2", "--memory", "256"])
    out = capsys.readouterr().out
    assert rc == 2 and "does not fit" in out and "iogpu.wired_limit_mb=" in out
    assert "sudo sysctl" not in out  # no setup advice for a plan that cannot run
    assert cli_main(["plan", "--model", str(K2_CONFIG), "--memory", "512,512"]) == 0
    assert "sudo sysctl iogpu.wired_limit_mb=491520" in capsys.readouterr().out


def test_plan_defaults_to_the_checkpoints_own_bits(tmp_path, capsys):
    cfg = json.loads(K2_CONFIG.read_text())
    cfg["quantization"] = {"bits": 8, "group_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["plan", "--model", str(tmp_path), "--memory", "512,512,512", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["bits"], p["group_size"]) == (8, 32)
    assert p["weight_bytes"] > 1.05 * 2**40 / 1.1  # 8.5 bits/param on ~1T params: about 1 TiB


def test_plan_of_an_int4_checkpoint(tmp_path, capsys):
    """K2-Thinking: experts INT4 group 32, everything else bf16. The published files are ~594 GB;
    in MLX each group of 32 also carries a bf16 bias (-8 * scale), ~63 GB more: ~657 GB."""
    cfg = json.loads(K2_CONFIG.read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                      "num_bits": 4, "group_size": 32, "symmetric": True, "strategy": "group",
                                      "type": "int"}}}, "ignore": ["lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["plan", "--model", str(tmp_path), "--memory", "512,512", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["class_bits"] == {"experts": 4} and p["bits"] == 16
    total, _ = hand_params()
    routed = N_MOE * E * n(EXPERT)
    # routed: 4 bits + a bf16 scale and bias per 32 weights; the rest bf16
    want = routed // 2 + routed // 32 * 4 + (total - routed) * 2 + N_MOE * E * 2  # router bias is float32
    assert p["weight_bytes"] == want
