"""`--model`: a folder, a Hugging Face repo id resolved in the local cache (no network), or
nothing (the embedded k2-nano, with no fallback to random weights); and a checkpoint without a
tokenizer is one clear error in every command."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import k2mlx
from k2mlx.errors import CheckpointError
from k2mlx.loading import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    """A tiny K2 with one shard per layer: 1 = layer 0 + embed, ..., 4 = layer 3 + norm/head."""
    from k2mlx.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("four") / "k2", num_shards=4)


def hub_layout(cache: Path, repo: str, src: Path, skip: tuple = ()) -> Path:
    """The Hugging Face cache layout of `repo` with src's files (blobs + snapshot symlinks),
    leaving out `skip` (a partial, per-stage download)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in sorted(src.iterdir()):
        if f.name in skip:
            continue
        blob = root / "blobs" / f"blob-{f.name}"
        shutil.copy2(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_repo_id_resolves_to_its_cached_snapshot(hub, four_shards, prompt=None):
    snap = hub_layout(hub, "org/tiny-k2", four_shards)
    assert resolve.resolve_model("org/tiny-k2") == snap
    model, tok = k2mlx.load("org/tiny-k2")
    assert tok is not None and model.is_first and model.is_last


def test_hf_home_is_read_when_hub_cache_is_unset(tmp_path, monkeypatch, four_shards):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = hub_layout(tmp_path / "hf" / "hub", "org/tiny-k2", four_shards)
    assert resolve.resolve_model("org/tiny-k2") == snap


def test_absent_repo_prints_the_download_command(hub):
    with pytest.raises(CheckpointError, match=r"fetch it with: k2mlx download org/absent$"):
        resolve.resolve_model("org/absent")
    with pytest.raises(CheckpointError, match=r"k2mlx download org/absent --layers 0:2$"):
        resolve.resolve_model("org/absent", range(0, 2))


def test_a_rank_resolves_with_only_its_own_shards(hub, four_shards):
    """Host 0 of a pipeline downloaded layers 0:2 (shards 1 and 2): it resolves and loads its
    stage; the whole model, or another stage, names what to download."""
    snap = hub_layout(hub, "org/tiny-k2", four_shards,
                      skip=("model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"))
    assert resolve.resolve_model("org/tiny-k2", range(0, 2)) == snap
    model, _ = k2mlx.load("org/tiny-k2", layers=range(0, 2))
    assert model.layer_range == range(0, 2)
    with pytest.raises(CheckpointError, match=r"2 shard file\(s\) are missing.*k2mlx download org/tiny-k2$"):
        resolve.resolve_model("org/tiny-k2")
    with pytest.raises(CheckpointError, match=r"for layers 2:4.*k2mlx download org/tiny-k2 --layers 2:4$"):
        k2mlx.load("org/tiny-k2", layers=range(2, 4))


def test_folder_paths_still_win_and_bad_names_are_clear(tmp_path, four_shards, monkeypatch):
    monkeypatch.chdir(four_shards.parent.parent)
    rel = f"{four_shards.parent.name}/{four_shards.name}"  # looks like a repo id, is a folder
    assert resolve.resolve_model(rel) == Path(rel)
    with pytest.raises(CheckpointError, match="expected a model folder, got a file"):
        resolve.resolve_model(four_shards / "config.json")
    assert resolve.resolve_model(four_shards / "config.json", allow_file=True) == four_shards / "config.json"
    with pytest.raises(CheckpointError, match="model folder not found"):
        resolve.resolve_model(str(tmp_path / "a" / "b" / "c"))


def test_missing_embedded_model_is_an_error_not_random_weights(tmp_path, monkeypatch):
    """Loading never falls back to building a random checkpoint (issue 13)."""
    monkeypatch.setattr(resolve, "embedded_model_path", lambda: tmp_path / "no-such-asset")
    monkeypatch.setenv("K2MLX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="embedded k2-nano model is missing"):
        k2mlx.load()
    from k2mlx.tiny import default_model_path

    with pytest.raises(CheckpointError, match="embedded k2-nano"):
        default_model_path()
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_default_is_the_embedded_asset():
    assert resolve.resolve_model(None) == resolve.embedded_model_path()
    assert (resolve.embedded_model_path() / "config.json").is_file()


# ---- the CLI: repo ids everywhere, and one line for a checkpoint without a tokenizer ----

def k2mlx_cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "k2mlx.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_plan_takes_a_repo_id(hub, four_shards):
    hub_layout(hub, "org/tiny-k2", four_shards)
    r = k2mlx_cli("plan", "--model", "org/tiny-k2", "--memory", "16", "--json", env={"HF_HUB_CACHE": str(hub)})
    assert r.returncode == 0, r.stderr
    r = k2mlx_cli("plan", "--model", "org/absent", "--memory", "16", env={"HF_HUB_CACHE": str(hub)})
    assert r.returncode == 1 and r.stderr.strip().endswith("k2mlx download org/absent")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def no_tokenizer(four_shards, tmp_path_factory):
    dst = tmp_path_factory.mktemp("notok") / "k2"
    shutil.copytree(four_shards, dst)
    (dst / "tiktoken.model").unlink()
    return dst


def test_generate_without_tokenizer_is_one_line(no_tokenizer):
    r = k2mlx_cli("generate", "--model", str(no_tokenizer), "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiktoken.model" in lines[0] and "Traceback" not in r.stderr, r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_tokenizer_refuses_to_start(no_tokenizer):
    """serve used to start and answer every request with a 500; it now exits at once."""
    port = _free_port()
    r = k2mlx_cli("serve", "--model", str(no_tokenizer), "--host", "127.0.0.1", "--port", str(port), timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiktoken.model" in lines[0], r.stderr
    with socket.socket() as s:  # nothing is listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_convert_and_check_take_a_repo_id(hub, four_shards, tmp_path):
    from k2mlx.loading.check import check
    from k2mlx.loading.convert import convert

    hub_layout(hub, "org/tiny-k2", four_shards)
    out = convert("org/tiny-k2", tmp_path / "q4", bits=4, group_size=32, progress=False).out
    assert k2mlx.load(out)[1] is not None  # the tokenizer files came along
    assert check("org/tiny-k2").ok
    r = k2mlx_cli("convert", "--model", "org/absent", "--out", str(tmp_path / "x"), "--quiet",
                  env={"HF_HUB_CACHE": str(hub)})
    assert r.returncode == 1 and r.stderr.strip().endswith("k2mlx download org/absent")
    assert not (tmp_path / "x").exists()


def test_download_verifies_the_stage_it_fetched(hub, four_shards):
    """Offline, `k2mlx download` serves from the cache and checks, with the same resolution as
    --model, that every shard of the requested stage is there."""
    snap = hub_layout(hub, "org/tiny-k2", four_shards,
                      skip=("model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"))
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    r = k2mlx_cli("download", "org/tiny-k2", "--layers", "0:2", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == snap
    r = k2mlx_cli("download", "org/tiny-k2", "--quiet", env=env)
    assert r.returncode == 1 and "2 shard file(s) are still missing" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_without_tokenizer_fails_before_the_app_opens(no_tokenizer):
    r = k2mlx_cli("chat", "--model", str(no_tokenizer), timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiktoken.model" in lines[0], r.stderr


def test_generate_takes_a_repo_id(hub, four_shards):
    hub_layout(hub, "org/tiny-k2", four_shards)
    env = {"HF_HUB_CACHE": str(hub)}
    r = k2mlx_cli("generate", "--model", "org/tiny-k2", "--prompt", "hi", "--max-tokens", "2", "--temp", "0", env=env)
    assert r.returncode == 0, r.stderr
    r = k2mlx_cli("generate", "--model", "org/absent", "--prompt", "hi", env=env)
    assert r.returncode == 1 and r.stderr.strip().endswith("fetch it with: k2mlx download org/absent"), r.stderr
