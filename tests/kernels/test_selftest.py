"""`k2mlx selftest` runs its checks on this machine, reports skips with reasons, and fails
(exit 1) when a check fails."""
from __future__ import annotations

import argparse
import json
import shutil

from k2mlx.commands import selftest
from k2mlx.kernels.launch import gpu_backend


def run_selftest(tmp_path, *argv):
    p = argparse.ArgumentParser()
    selftest.add_arguments(p)
    out = tmp_path / "report.json"
    args = p.parse_args([*argv, "--json", str(out)])
    rc = selftest.run(args)
    return rc, {r["check"]: r for r in json.loads(out.read_text())}


def test_selftest_passes_here_and_says_why_it_skips(tmp_path, capsys):
    rc, res = run_selftest(tmp_path)
    printed = capsys.readouterr().out
    assert rc == 0, res
    assert "k2mlx selftest" in printed and "passed" in printed
    assert res["reference dispatch = per-token loop"]["status"] == "passed"
    # on a Mac the Metal checks run and pass; elsewhere they are skipped with the reason
    backend = gpu_backend()
    for name, be in (("Metal: router kernel", "metal"), ("Metal: dispatch kernels", "metal"),
                     ("CUDA: router kernel", "cuda"), ("CUDA: dispatch kernels", "cuda")):
        if backend == be:
            assert res[name]["status"] == "passed", res[name]
        else:
            assert res[name]["status"] == "skipped" and "not available" in res[name]["detail"]
    moe = res["MoE path chosen at load"]
    assert moe["status"] == "passed" and "asked auto" in moe["detail"], moe
    if backend is None:
        assert "experts switch, router compiled (cpu" in moe["detail"], moe
    else:
        assert "measured" in moe["detail"] or "cache" in moe["detail"], moe
    want_cpp = "passed" if shutil.which("g++") else "skipped"
    assert res["C++ twin: dispatch kernels"]["status"] == want_cpp
    assert res["C++ twin: router kernel"]["status"] == want_cpp
    assert res["generation with the default model"]["status"] == "passed"
    assert res["pipeline: 2 loopback ranks"]["status"] in ("passed", "skipped")
    assert not [r for r in res.values() if r["status"] == "failed"]


def test_selftest_reports_a_failing_check_and_exits_1(tmp_path):
    rc, res = run_selftest(tmp_path, "--only", "generate", "--model", str(tmp_path / "no-such-model"))
    assert rc == 1
    (r,) = res.values()
    assert r["status"] == "failed" and "no-such-model" in r["detail"]


def test_selftest_shows_an_override(tmp_path, monkeypatch):
    monkeypatch.setenv("K2MLX_MOE_PATH", "reference")
    rc, res = run_selftest(tmp_path, "--only", "moe-path")
    assert rc == 0
    assert "experts reference, router compiled (override" in res["MoE path chosen at load"]["detail"]


def test_selftest_bench_prints_a_report_table(tmp_path, capsys):
    """--bench gives the machine, the path chosen and decode tok/s per MoE path for the
    default model and the K2-shaped stack (here: the CPU paths, switch and reference)."""
    import mlx.core as mx

    rc, _ = 0, None
    p = argparse.ArgumentParser()
    selftest.add_arguments(p)
    out = tmp_path / "bench.json"
    rc = selftest.run(p.parse_args(["--bench", "--json", str(out)]))
    printed = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["machine"]["mlx"] == mx.__version__ and res["machine"]["memory_gb"] > 0
    assert res["machine"]["chip"] and res["machine"]["chip"] in printed
    want = ["switch", "reference"] + (["kernel"] if gpu_backend() else [])
    assert len(res["models"]) == 2 and res["models"][1]["model"].startswith("K2 stack")
    for r in res["models"]:
        assert sorted(r["tok_s"]) == sorted(want)
        assert r["tok_s"]["switch"] > 0 and r["tok_s"]["reference"] > 0
        assert r["auto"].split(" ")[0] in ("switch/compiled", "kernel/compiled", "kernel/kernel", "switch/kernel")
    assert "switch tok/s" in printed and "auto chose" in printed
