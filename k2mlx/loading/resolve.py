"""What `--model` names, turned into a local checkpoint folder: the one resolution every
command goes through (k2mlx.load, plan, convert, check, download).

`--model` may be
- nothing: the embedded k2-nano (`k2mlx/assets/k2-nano`); a missing asset is an error, never a
  silent fallback to random weights;
- a folder (or, where a command allows it, a config.json file);
- a Hugging Face repo id (`owner/name`): looked up in the local Hugging Face cache only
  (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; folder
  `models--owner--name/snapshots/<commit>`, the commit of `refs/main` first). Nothing is
  downloaded here: when the repo, or a shard the requested layers need, is not there, the
  error prints the exact `k2mlx download ...` command that fetches it.

With `layers`, only the shards holding those layers must be present (plus the embedding on
the first stage and norm/lm_head on the last), so a pipeline rank that downloaded its own
part resolves without the others' files.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from k2mlx.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def embedded_model_path() -> Path:
    """Where the embedded k2-nano lives inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "k2-nano"


def default_model_path() -> Path:
    """The model used when none is given: the embedded k2-nano."""
    asset = embedded_model_path()
    if not (asset / "config.json").is_file():
        raise CheckpointError("the embedded k2-nano model is missing from this installation (reinstall k2mlx, "
                              "or pass --model FOLDER|REPO)", file=str(asset / "config.json"))
    return asset


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as huggingface_hub reads it."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def is_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and ".." not in spec


def download_command(repo: str, layers: range | None = None) -> str:
    return f"k2mlx download {repo}" + (f" --layers {layers.start}:{layers.stop}" if layers is not None else "")


def cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of `repo` holding a config.json, or None."""
    root = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return None
    candidates = []
    try:
        ref = (root / "refs" / "main").read_text().strip()
    except OSError:
        ref = ""
    if ref and re.fullmatch(r"[0-9a-f]{6,64}", ref):
        candidates.append(snaps / ref)
    # then any other snapshot, newest first (a download pinned to another revision)
    others = sorted((p for p in snaps.iterdir() if p.is_dir() and p not in candidates),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates + others:
        if (snap / "config.json").is_file():
            return snap
    return None


def missing_files(folder: Path, layers: range | None = None) -> list[str]:
    """Shard files (relative) the stage owning `layers` (None: the whole model) needs but the
    folder lacks. Reads config.json and the index only."""
    from k2mlx.loading.shards import INDEX, files_for_layers

    index = folder / INDEX
    if not index.is_file():
        return [] if any(folder.glob("*.safetensors")) else ["*.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"index is unreadable ({e})", file=str(index)) from None
    if layers is None:
        needed = sorted(set(weight_map.values()))
    else:
        needed = files_for_layers(folder, layers)
    return [f for f in needed if not (folder / f).is_file()]


def resolve_model(spec=None, layers: range | None = None, allow_file: bool = False) -> Path:
    """The local folder (or config.json file, with allow_file) that `spec` names.

    layers: a repo id must then hold only the shards of those layers."""
    if spec is None:
        return default_model_path()
    text = str(spec)
    p = Path(text).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        if allow_file:
            return p
        # e.g. --model .../config.json: say what to pass instead
        raise CheckpointError(f"expected a model folder, got a file (pass its folder {p.parent})", file=str(p))
    if not is_repo_id(text):
        raise CheckpointError("model folder not found (pass a checkpoint folder or a Hugging Face repo id "
                              "such as mlx-community/Kimi-K2-Thinking-4bit)", file=str(p))
    snap = cached_snapshot(text)
    if snap is None:
        raise CheckpointError(f"no folder {text!r} and {text} is not in the local Hugging Face cache "
                              f"({hub_cache_dir()}); fetch it with: {download_command(text, layers)}")
    missing = missing_files(snap, layers)
    if missing:
        part = "" if layers is None else f" for layers {layers.start}:{layers.stop}"
        raise CheckpointError(f"{text} is in the Hugging Face cache ({snap}) but {len(missing)} shard file(s)"
                              f"{part} are missing (first: {missing[0]}); fetch them with: "
                              f"{download_command(text, layers)}")
    return snap


__all__ = ["resolve_model", "default_model_path", "embedded_model_path", "hub_cache_dir", "cached_snapshot",
           "missing_files", "download_command", "is_repo_id"]
