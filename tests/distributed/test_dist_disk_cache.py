"""The disk prompt cache on a pipeline (distributed/disk_pipeline.py), over two real ranks on
loopback (float32 tiny checkpoint, blocks of 16 tokens): each rank writes only its own layers'
blocks; a restart hits with the same logprobs as one process without any cache, and the engine's
cached-token count says so; a block deleted or garbled on ONE rank only makes the hit shorter
(or a miss), never the output different; --no-prompt-cache writes nothing on any rank. The same
under tensor parallelism, where every rank keeps whole blocks of every layer."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

BLOCK = 16
ROLE = "k2mlx.distributed.disk_scenarios:disk_cache_logprobs"


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, 300, size=n)]


PROMPTS = [prompt(4 * BLOCK + 6, s) for s in (1, 2, 3)]  # 4 whole blocks before the last token


def launch(ckpt, role_args: dict, layers=((0, 2), (2, 4)), timeout=300, tensor: int = 0):
    """Ranks on loopback: a pipeline over `layers`, or `tensor` tensor-parallel ranks."""
    n = tensor or len(layers)
    cmd = [sys.executable, "-m", "k2mlx.distributed.launch", "--hosts", ",".join(["127.0.0.1"] * n),
           "--model", str(ckpt), "--role", ROLE, "--role-args", json.dumps(role_args)]
    cmd += ["--parallel", "tensor"] if tensor else ["--layers", json.dumps([list(r) for r in layers])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"launcher failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def run_pipeline(ckpt, tmp_path, name: str, layers=((0, 2), (2, 4)), tensor: int = 0, **kw) -> dict:
    out = tmp_path / f"{name}.json"
    args = {"prompts": PROMPTS, "out": str(out), "prompt_cache_dir": str(tmp_path / "pc"), "prompt_cache_gb": 1.0,
            "prompt_cache_block": BLOCK, **kw}
    p = launch(ckpt, args, layers, tensor=tensor)
    return {**json.loads(out.read_text()), "stderr": p.stderr}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tiny_tokenizer, tmp_path_factory) -> dict:
    """One process, no disk cache at all."""
    from k2mlx import load
    from k2mlx.distributed.disk_scenarios import disk_cache_logprobs

    out = tmp_path_factory.mktemp("ref") / "ref.json"
    model, _ = load(str(tiny_checkpoint))
    disk_cache_logprobs(model, tiny_tokenizer, out=str(out), prompts=PROMPTS, no_prompt_cache=True)
    return json.loads(out.read_text())


def assert_same(ref: dict, got: dict) -> None:
    for a, b in zip(ref["runs"], got["runs"], strict=True):
        assert len(a["logprobs"]) == len(b["logprobs"]) == 4
        for (lp_a, top_a), (lp_b, top_b) in zip(a["logprobs"], b["logprobs"]):
            assert abs(lp_a - lp_b) <= 1e-5
            assert np.max(np.abs(np.array(top_a) - np.array(top_b))) <= 1e-5


def header(path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])["__metadata__"]


def rank_folders(root) -> dict[str, object]:
    """{"0,1": rank 0's folder, "2,3": rank 1's}, told apart by the layers their blocks hold."""
    out = {}
    for sub in root.iterdir():
        files = sorted(sub.glob("*.kvblock"))
        assert files, sub
        layers = {header(f)["layers"] for f in files}
        assert len(layers) == 1, layers
        out[layers.pop()] = sub
    return out


def block_file(folder, tokens: list[int], i: int):
    """The file of block i of `tokens` in one rank's folder (found by the tokens it holds)."""
    want = ",".join(map(str, tokens[i * BLOCK:(i + 1) * BLOCK]))
    hits = [f for f in folder.glob("*.kvblock") if header(f)["tokens"] == want]
    assert len(hits) == 1, (i, hits)
    return hits[0]


def test_restart_hits_every_ranks_part_with_one_process_logprobs(tiny_checkpoint, tmp_path, reference):
    cold = run_pipeline(tiny_checkpoint, tmp_path, "cold")
    assert [r["cached"] for r in cold["runs"]] == [0, 0, 0]
    assert_same(reference, cold)
    folders = rank_folders(tmp_path / "pc")
    assert sorted(folders) == ["0,1", "2,3"]  # each rank stored only its own layers' part
    for f in folders.values():
        assert len(list(f.glob("*.kvblock"))) == 3 * 4
    warm = run_pipeline(tiny_checkpoint, tmp_path, "warm")  # a restart of the whole cluster
    assert [r["cached"] for r in warm["runs"]] == [4 * BLOCK] * 3
    assert warm["stats"]["hits"] == 3 and warm["stats"]["short_hits"] == 0
    assert_same(reference, warm)


def test_a_bad_block_on_one_rank_shortens_the_hit_never_the_output(tiny_checkpoint, tmp_path, reference):
    run_pipeline(tiny_checkpoint, tmp_path, "cold")
    folders = rank_folders(tmp_path / "pc")
    garbled = block_file(folders["2,3"], PROMPTS[0], 1)  # rank 1 only: prompt 0 keeps block 0
    data = bytearray(garbled.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    garbled.write_bytes(bytes(data))
    bad = bytes(data)
    block_file(folders["0,1"], PROMPTS[1], 0).unlink()  # rank 0 only: prompt 1 misses
    block_file(folders["2,3"], PROMPTS[2], 3).unlink()  # rank 1 only: prompt 2 keeps 3 blocks
    warm = run_pipeline(tiny_checkpoint, tmp_path, "warm")
    assert [r["cached"] for r in warm["runs"]] == [BLOCK, 0, 3 * BLOCK]
    assert warm["stats"]["short_hits"] == 2
    assert_same(reference, warm)
    # the rank that found it removed it with a warning, and saved that block again afterwards
    assert "data digest mismatch" in warm["stderr"]
    assert garbled.read_bytes() != bad and header(garbled)["tokens"] == ",".join(map(str, PROMPTS[0][16:32]))


def test_three_ranks_hit_only_the_blocks_the_middle_rank_has(tiny_checkpoint, tmp_path, reference):
    three = ((0, 1), (1, 3), (3, 4))
    run_pipeline(tiny_checkpoint, tmp_path, "cold", layers=three)
    folders = rank_folders(tmp_path / "pc")
    assert sorted(folders) == ["0", "1,2", "3"]
    block_file(folders["1,2"], PROMPTS[0], 2).unlink()  # the middle rank only
    warm = run_pipeline(tiny_checkpoint, tmp_path, "warm", layers=three)
    assert [r["cached"] for r in warm["runs"]] == [2 * BLOCK, 4 * BLOCK, 4 * BLOCK]
    assert_same(reference, warm)


def test_no_prompt_cache_writes_nothing_on_any_rank(tiny_checkpoint, tmp_path, reference):
    got = run_pipeline(tiny_checkpoint, tmp_path, "off", no_prompt_cache=True)
    assert got["stats"] is None and [r["cached"] for r in got["runs"]] == [0, 0, 0]
    assert not (tmp_path / "pc").exists()
    assert_same(reference, got)


def serve_restart(ckpt, tmp_path, monkeypatch, rules: int, *flags) -> tuple:
    """`k2mlx serve --hosts 127.0.0.1,127.0.0.1 *flags` (default blocks of 256) twice over one
    prompt cache folder, the same greedy request each time: (folder, usage and answer of the cold
    run, of the restarted one). The cold run waits until both ranks have written their blocks."""
    import os
    import time

    import httpx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))
    from k2serve_util import start_server, stop_server

    monkeypatch.setenv("K2MLX_STATE_DIR", str(tmp_path / "state"))
    system = " ".join(f"rule {i}: keep the tests green and the diffs small." for i in range(rules))  # ~12/rule
    folder = tmp_path / "pc"
    args = ("--hosts", "127.0.0.1,127.0.0.1", *flags, "--prompt-cache-dir", str(folder), "--cache-gb", "0")
    whole = (rules * 12) // 256  # whole blocks the system prompt alone fills (at least)

    def chat(base):
        r = httpx.post(base + "/v1/chat/completions", timeout=180, json={
            "model": "k2-tiny", "max_tokens": 4, "temperature": 0, "logprobs": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Rule 3?"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        lps = [c["logprob"] for c in body["choices"][0]["logprobs"]["content"]]
        return body["usage"], body["choices"][0]["message"]["content"], lps

    runs = []
    for cold in (True, False):
        proc, base = start_server(ckpt, *args)
        try:
            runs.append(chat(base))
            deadline = time.time() + 60  # both ranks write off the request path
            while cold and time.time() < deadline:
                subs = [d for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []
                if len(subs) == 2 and all(len(list(d.glob("*.kvblock"))) >= whole for d in subs):
                    break
                time.sleep(0.2)
        finally:
            stop_server(proc)
    (usage0, text0, lps0), (usage1, text1, lps1) = runs
    assert (usage0.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    hit = usage1["prompt_tokens_details"]["cached_tokens"]
    assert hit >= whole * 256 and hit % 256 == 0 and hit < usage1["prompt_tokens"]
    assert text1 == text0 and len(lps1) == len(lps0) == 4
    assert max(abs(a - b) for a, b in zip(lps0, lps1)) <= 1e-5
    return folder


def test_serve_hosts_restart_hits_and_reports_cached_tokens(tiny_checkpoint, tmp_path, monkeypatch):
    """`k2mlx serve --hosts 127.0.0.1,127.0.0.1`: a restarted cluster answers a long system prompt
    (~1,500 tokens) from both ranks' disk parts, usage says so, and the greedy answer and its
    logprobs are those of the cold cluster."""
    folder = serve_restart(tiny_checkpoint, tmp_path, monkeypatch, 120)
    assert sorted(rank_folders(folder)) == ["0,1", "2,3"]


def test_worker_answers_hostile_lookups_with_no_blocks_and_refuses_unknown_pins(tmp_path, tiny_checkpoint):
    from k2mlx import load
    from k2mlx.distributed.disk_pipeline import WorkerDisk, open_stage_cache

    model, _ = load(str(tiny_checkpoint), layers=range(2, 4))
    w = WorkerDisk(open_stage_cache(model, tiny_checkpoint, {"dir": str(tmp_path / "pc"), "gb": 1.0, "block": BLOCK}))
    try:
        for bad in (b"\xff garbage", b"[1, 2]", json.dumps({"pin": 1, "n": "x", "tokens": []}).encode(),
                    json.dumps({"pin": 1, "n": 2, "tokens": PROMPTS[0][:2 * BLOCK]}).encode()):  # nothing stored
            assert json.loads(w.answer(bad))["n"] == 0
        assert w.pins == {}
        with pytest.raises(RuntimeError, match="does not hold"):
            w.apply(["disk_load", 7, BLOCK, [[1, 2]]], {})
        w.apply(["disk_save", PROMPTS[0], [12345, 678]], {})  # unknown caches: skipped, logged
        w.apply(["disk_unpin", 99], {})
    finally:
        w.close()


def test_blocks_of_one_process_never_hit_a_pipeline_in_the_same_folder(tiny_checkpoint, tiny_tokenizer, tmp_path,
                                                                       reference):
    from k2mlx import load
    from k2mlx.distributed.disk_scenarios import disk_cache_logprobs

    model, _ = load(str(tiny_checkpoint))
    kw = {"prompts": PROMPTS, "prompt_cache_dir": str(tmp_path / "pc"), "prompt_cache_gb": 1.0,
          "prompt_cache_block": BLOCK, "model": str(tiny_checkpoint)}
    for name in ("one0", "one1"):  # the second run proves the single process's blocks load for itself
        disk_cache_logprobs(model, tiny_tokenizer, out=str(tmp_path / name), **kw)
    assert [r["cached"] for r in json.loads((tmp_path / "one1").read_text())["runs"]] == [4 * BLOCK] * 3
    got = run_pipeline(tiny_checkpoint, tmp_path, "pp")  # other layer ranges: other identities
    assert [r["cached"] for r in got["runs"]] == [0, 0, 0]
    assert_same(reference, got)


# ---- tensor parallelism: every rank keeps whole blocks of every layer ---------------------------
def tensor_folders(root, stats: dict) -> tuple:
    """(rank 0's folder, rank 1's folder): rank 0 names its own in its stats."""
    mine = root / stats["dir"].rsplit("/", 1)[-1]
    other = [d for d in root.iterdir() if d.is_dir() and d != mine]
    assert mine.is_dir() and len(other) == 1, list(root.iterdir())
    return mine, other[0]


def test_tensor_ranks_keep_whole_blocks_and_a_restart_hits_with_one_process_logprobs(tiny_checkpoint, tmp_path,
                                                                                    reference):
    cold = run_pipeline(tiny_checkpoint, tmp_path, "cold", tensor=2)
    assert [r["cached"] for r in cold["runs"]] == [0, 0, 0]
    assert_same(reference, cold)
    r0, r1 = tensor_folders(tmp_path / "pc", cold["stats"])
    for f in (r0, r1):  # each rank wrote its own copy of every block, with every layer in it
        files = list(f.glob("*.kvblock"))
        assert len(files) == 3 * 4 and {header(b)["layers"] for b in files} == {"0,1,2,3"}
    warm = run_pipeline(tiny_checkpoint, tmp_path, "warm", tensor=2)  # the whole group restarted
    assert [r["cached"] for r in warm["runs"]] == [4 * BLOCK] * 3
    assert warm["stats"]["hits"] == 3 and warm["stats"]["short_hits"] == 0 and warm["stats"]["ranks"] == 2
    assert_same(reference, warm)
    # a block missing on ONE rank makes the hit shorter there, never the output different
    block_file(r1, PROMPTS[0], 1).unlink()  # rank 1 only: prompt 0 keeps block 0
    block_file(r0, PROMPTS[1], 0).unlink()  # rank 0 only: prompt 1 misses
    again = run_pipeline(tiny_checkpoint, tmp_path, "again", tensor=2)
    assert [r["cached"] for r in again["runs"]] == [BLOCK, 0, 4 * BLOCK]
    assert again["stats"]["short_hits"] == 1
    assert_same(reference, again)


def test_tensor_blocks_never_hit_a_pipeline_or_one_process(tiny_checkpoint, tmp_path, reference):
    """Other shapes, other identities: a tensor rank's blocks are its own."""
    run_pipeline(tiny_checkpoint, tmp_path, "tp", tensor=2)
    pp = run_pipeline(tiny_checkpoint, tmp_path, "pp")
    assert [r["cached"] for r in pp["runs"]] == [0, 0, 0]
    assert_same(reference, pp)


def test_serve_hosts_tensor_restart_hits_the_disk_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """`k2mlx serve --hosts 127.0.0.1,127.0.0.1 --parallel tensor`: the disk cache is on (it was
    off under tensor before), a restart answers from it and says so in usage, same answer."""
    folder = serve_restart(tiny_checkpoint, tmp_path, monkeypatch, 50, "--parallel", "tensor")
    assert len([d for d in folder.iterdir() if d.is_dir()]) == 2  # one folder per rank
