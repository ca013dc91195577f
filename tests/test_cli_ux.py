"""What a first user meets on the command line: one clear line per mistake, output that fits the
terminal, no stray debug prints. Each test is a bug found by running the commands by hand."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from k2mlx.cli import main

FIXTURE_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "kimi-k2-config.json")


def _cli(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "k2mlx.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"k2mlx {command}: error: "), err
    return err[0]


def test_plan_table_fits_80_columns():
    p = _cli("plan", "--model", FIXTURE_CONFIG, "--hosts", "2", "--memory", "512,256", "--context", "131072",
             env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    # each host is one row: sizes were broken over two lines ("358.5" / "GiB")
    rows = [line for line in lines if re.match(r"^[01]\s+\d+ GB\s+\d+\.\.\d+ \(\d+\)\s", line)]
    assert len(rows) == 2, lines
    for row in rows:
        assert len(re.findall(r"\d[\d,.]* GiB", row)) == 4, row  # weights, KV, total, usable
        assert row.split()[-1] == "yes"


def test_model_path_that_is_a_file(tiny_checkpoint, capsys):
    rc = main(["generate", "--model", os.path.join(tiny_checkpoint, "config.json")])
    assert rc == 1
    line = _one_error_line(capsys, "generate")
    assert "expected a model folder, got a file" in line and str(tiny_checkpoint) in line


def _llama_folder(folder, tiny_checkpoint):
    """A folder with a tokenizer (load() reads it first) and a config of an unsupported type."""
    import shutil

    for f in os.listdir(tiny_checkpoint):
        if f.startswith("tokeni") or f.endswith(".model"):
            shutil.copy(os.path.join(tiny_checkpoint, f), folder / f)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))


def test_unknown_model_type_lists_the_known_ones(tmp_path, capsys, tiny_checkpoint):
    _llama_folder(tmp_path, tiny_checkpoint)
    assert main(["generate", "--model", str(tmp_path)]) == 1
    line = _one_error_line(capsys, "generate")
    assert "unknown model_type 'llama' (expected one of kimi_k2, deepseek_v3, kimi_k25)" in line


def test_debug_is_accepted_after_the_command(tmp_path, tiny_checkpoint):
    from k2mlx.errors import ConfigError

    _llama_folder(tmp_path, tiny_checkpoint)
    with pytest.raises(ConfigError):  # --debug re-raises for the traceback
        main(["generate", "--model", str(tmp_path), "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "generate", "--model", str(tmp_path)])


def test_serve_on_a_busy_port_fails_before_loading(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--port", str(port), "--model", "/nonexistent/never-loaded"])
    assert rc == 1
    line = _one_error_line(capsys, "serve")
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_serve_non_loopback_without_key_is_refused(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    line = _one_error_line(capsys, "serve")
    assert "--api-key" in line and "0.0.0.0" in line


def test_download_offline_is_one_line_and_quick(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    assert main(["download", "moonshotai/Kimi-K2-Instruct", "--layers", "0:10"]) == 1
    line = _one_error_line(capsys, "download")
    assert "HF_HUB_OFFLINE" in line and "moonshotai/Kimi-K2-Instruct" in line


def test_download_bad_layers_fails_before_the_network(monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any request would be refused
    assert main(["download", "x/y", "--layers", "5"]) == 1
    assert "--layers must look like START:STOP" in _one_error_line(capsys, "download")


@pytest.mark.parametrize("moe_path", ["reference", "auto"])
def test_bf16_checkpoint_generates_on_cpu(tmp_path_factory, moe_path):
    """MLX's CPU gather_mm is float32-only; float (unquantized) experts in bf16 crashed every
    generation with '[GatherMM::eval] Currently only supports float32', on the reference MoE
    path (k2mlx.kernels.reference) and on the model's own switch_mlp that "auto" picks on the CPU."""
    from k2mlx.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("k2-bf16"), preset="nano", dtype="bfloat16", seed=0)
    p = _cli("generate", "--model", str(path), "--max-tokens", "4", "--temp", "0",
             env={"K2MLX_MOE_PATH": moe_path})
    assert p.returncode == 0, p.stderr
    assert "finish: length" in p.stderr and "error" not in p.stderr


def test_bf16_reference_experts_match_float32():
    import mlx.core as mx

    from k2mlx.kernels.reference import Proj

    mx.random.seed(0)
    w = mx.random.normal((4, 8, 16))                      # [E, out, in]
    x = mx.random.normal((3, 1, 1, 16))                   # [T, 1, 1, in]
    idx = mx.array([0, 3, 1], dtype=mx.uint32).reshape(3, 1, 1)
    y = Proj(w.astype(mx.bfloat16))(x.astype(mx.bfloat16), idx)  # raised on the CPU before
    ref = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)
    assert y.dtype == mx.bfloat16 and y.shape == ref.shape
    assert mx.allclose(y.astype(mx.float32), ref, atol=0.15).item()


def test_selftest_pipeline_report_has_no_stray_output():
    p = _cli("selftest", "--only", "pipeline", env={"COLUMNS": "100"}, timeout=300)
    assert p.returncode == 0, p.stderr
    first = p.stdout.lstrip().splitlines()[0]
    assert first.startswith("k2mlx selftest"), p.stdout[:300]
    assert "tokens [[" not in p.stdout


def test_cluster_status_sizes_are_readable():
    from k2mlx.commands.cluster import _size

    assert _size(1.08e6) == "1.08 MB"  # a tiny model's rank read "0.00 GB"
    assert _size(3.6e11) == "360.00 GB"
    assert _size(512) == "512 B"


def test_convert_reports_a_readable_size(tiny_checkpoint, tmp_path):
    p = _cli("convert", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "q4"), "--bits", "4", "--quiet")
    assert p.returncode == 0, p.stderr
    assert re.search(r"tensors, \d+\.\d\d (MiB|KiB) in 1 shard", p.stdout), p.stdout  # was "0.00 GiB"


@pytest.mark.parametrize("kind", ["missing", "unknown_type"])
def test_chat_with_a_bad_model_fails_before_the_app_opens(tmp_path, kind):
    model = tmp_path / "model"
    if kind == "unknown_type":
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    try:  # the app used to open and show the error inside it, waiting for the user
        p = _cli("chat", "--model", str(model), "--sessions-db", str(tmp_path / "s.db"), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("k2mlx chat opened the app instead of failing")
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("k2mlx chat: error: ") and str(model) in err[0], err


# ---------------------------------------------------------------- plan / convert / flags (issue 13)

def _argparse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("memory,parallel", [("2", "pipeline"), ("256", "pipeline"), ("2,512", "pipeline"),
                                             ("2,512", "tensor")])
def test_plan_that_does_not_fit_says_by_how_much_and_prints_nothing_negative(memory, parallel, capsys):
    argv = ["plan", "--model", FIXTURE_CONFIG, "--memory", memory, "--parallel", parallel]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert not re.search(r"-\d", out), out  # was "usable -2040109465 B" and "wired_limit_mb=-2048"
    verdict = next(line for line in out.splitlines() if "does not fit" in line)
    assert re.search(r"\d[\d,.]* (GiB|MiB) short in all \(host \d needs", verdict), verdict
    if memory.split(",")[0] == "2":
        assert "host 0: 2 GB is all kept for macOS" in out
    assert main([*argv, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    numbers = [v for h in p["hosts"] for v in h.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert min(numbers) >= 0 and p["short_bytes"] > 0 and not p["fits"]
    assert all(h["num_layers"] >= 1 for h in p["hosts"])  # a host the OS reserve fills still gets a layer
    assert p["short_bytes"] == sum(max(0, h["bytes"] - h["usable_bytes"]) for h in p["hosts"])


@pytest.mark.parametrize("argv,flag", [(["--bits", "0"], "--bits"), (["--bits", "99"], "--bits"),
                                       (["--bits", "7"], "--bits"), (["--group-size", "7"], "--group-size"),
                                       (["--expert-bits", "1"], "--expert-bits"), (["--context", "-5"], "--context"),
                                       (["--hosts", "0"], "--hosts")])
def test_plan_refuses_what_mlx_cannot_quantize(argv, flag, capsys):
    line = _argparse_error(capsys, ["plan", "--model", FIXTURE_CONFIG, *argv])
    assert line.startswith(f"k2mlx plan: error: argument {flag}: "), line


def test_quantization_choices_are_what_mlx_quantize_accepts():
    import mlx.core as mx

    from k2mlx.quantization import MLX_BITS, MLX_GROUP_SIZES

    def ok(bits, group):
        try:
            mx.eval(*mx.quantize(mx.ones((2, 256)), group_size=group, bits=bits))
            return True
        except ValueError:
            return False

    assert all(ok(b, 64) for b in MLX_BITS)
    assert [b for b in range(2, 17) if ok(b, 64)] == list(MLX_BITS)  # 7 and 9..16 are not MLX bits
    assert [g for g in (8, 16, 32, 64, 128, 256) if ok(4, g)] == list(MLX_GROUP_SIZES)


def test_convert_group_size_7_is_refused_not_written_as_float(tiny_checkpoint, tmp_path, capsys):
    from k2mlx.errors import ConfigError
    from k2mlx.loading.convert import convert

    line = _argparse_error(capsys, ["convert", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "g7"),
                                    "--group-size", "7"])
    assert line.startswith("k2mlx convert: error: argument --group-size: must be one of 32, 64, 128"), line
    with pytest.raises(ConfigError, match="group size must be one of 32, 64, 128"):
        convert(tiny_checkpoint, tmp_path / "g7", bits=4, group_size=7, progress=False)
    with pytest.raises(ConfigError, match="experts bits must be one of"):
        convert(tiny_checkpoint, tmp_path / "g7", bits=4, group_size=64, class_bits={"experts": 7}, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_convert_removes_its_partial_folder_on_sigterm_and_sighup(tiny_checkpoint, tmp_path, sig):
    """The signal arrives while the first unit is written (sent by the process to itself)."""
    script = (
        "import os, signal\n"
        "from k2mlx.loading import convert as c\n"
        "real = c.Converter._unit\n"
        "def unit(self, *a, **k):\n"
        "    real(self, *a, **k)\n"
        f"    os.kill(os.getpid(), signal.{sig})\n"
        "c.Converter._unit = unit\n"
        f"c.convert({str(tiny_checkpoint)!r}, {str(tmp_path / 'q4')!r}, progress=False)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    import signal

    assert p.returncode == 128 + getattr(signal, sig), p.stderr
    assert f"stopped by {sig}; removed the partial output" in p.stderr
    assert list(tmp_path.iterdir()) == []  # was: .q4.partial-PID left behind


def test_convert_removes_partial_folders_of_dead_processes_and_says_so(tiny_checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".q4.partial-{dead_pid}"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".q4.partial-{os.getpid()}-x"  # not our name pattern: kept
    live.mkdir()
    running = tmp_path / f".q4.partial-{os.getppid()}"  # its process is alive: kept
    running.mkdir()
    p = _cli("convert", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "q4"), "--quiet")
    assert p.returncode == 0, p.stderr
    assert f"removed {stale}, left behind by an interrupted convert (process {dead_pid} is gone)" in p.stderr
    assert not stale.exists() and live.exists() and running.exists() and (tmp_path / "q4" / "config.json").exists()


def test_temp_out_of_range_names_the_flag(capsys):
    line = _argparse_error(capsys, ["generate", "--temp", "-1"])
    assert line == "k2mlx generate: error: argument --temp: must be between 0 and 2, got -1"  # was 'temperature'
    assert "argument --top-p" in _argparse_error(capsys, ["generate", "--top-p", "0"])
    assert "argument --max-tokens" in _argparse_error(capsys, ["generate", "--max-tokens", "0"])


def test_serve_negative_cache_is_refused(capsys):
    line = _argparse_error(capsys, ["serve", "--cache-gb", "-1"])
    assert line == "k2mlx serve: error: argument --cache-gb: must be at least 0, got -1"
    assert "argument --max-batch: must be at least 1" in _argparse_error(capsys, ["serve", "--max-batch", "0"])
    assert "argument --default-max-tokens" in _argparse_error(capsys, ["serve", "--default-max-tokens", "-5"])


def test_chat_flags_name_themselves(capsys):
    line = _argparse_error(capsys, ["chat", "--temp", "-1"])
    assert line == "k2mlx chat: error: argument --temp: must be between 0 and 2, got -1"
    assert "argument --max-tokens" in _argparse_error(capsys, ["chat", "--max-tokens", "0"])


def test_a_one_token_reply_prints_no_zero_rate(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--max-tokens", "1", "--temp", "0", "--raw"]) == 0
    err = capsys.readouterr().err
    assert "generation: 1 token\n" in err and "0.0 tokens/s" not in err, err


def test_a_bad_moe_path_is_one_line_before_any_work(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("K2MLX_MOE_PATH", "bogus")
    assert main(["generate", "--model", str(tiny_checkpoint), "--max-tokens", "2"]) == 1
    line = _one_error_line(capsys, "generate")
    assert "K2MLX_MOE_PATH" in line and "bogus" in line
    assert capsys.readouterr().out == ""  # no made-up prefill rate


@pytest.mark.parametrize("argv", [["--log-level", "debug", "plan"], ["plan", "--log-level", "debug"]])
def test_log_level_is_global(argv, capsys):
    import logging

    assert main([*argv, "--model", FIXTURE_CONFIG, "--json"]) == 0
    assert logging.getLogger("k2mlx").level == logging.DEBUG
    main(["plan", "--model", FIXTURE_CONFIG, "--json"])
    assert logging.getLogger("k2mlx").level == logging.WARNING


def test_readme_says_which_commands_default_to_the_embedded_model():
    """README claimed every command with --model defaults to k2-nano; plan and convert require it."""
    from pathlib import Path

    from k2mlx.cli import build_parser

    text = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    m = re.search(r"With no `--model`, (.+?) use `k2mlx/assets/k2-nano/` \(.*?; (.+?) always need a `--model`\)",
                  text)
    assert m, "the README sentence about --model defaults changed"
    optional = re.findall(r"`([a-z ]+)`", m.group(1))
    required = re.findall(r"`([a-z ]+)`", m.group(2))
    sub = build_parser()._subparsers._group_actions[0].choices

    def model_flag(name):
        parser = sub[name.split()[0]]
        if " " in name:
            parser = parser._subparsers._group_actions[0].choices[name.split()[1]]
        return parser._option_string_actions["--model"]

    have_model = [n for n, p in sub.items() if "--model" in p._option_string_actions]
    assert all(not model_flag(n).required for n in optional)
    assert all(model_flag(n).required for n in required)
    assert set(have_model) <= {n.split()[0] for n in optional + required}
