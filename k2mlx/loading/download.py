"""Download a checkpoint from the Hugging Face Hub, optionally only one pipeline stage's part.

With `layers`, the small files come first (config.json and the shard index), then only the
shards holding those layers (plus the embedding on the first stage, norm and lm_head on the
last) and the tokenizer/config files: each Mac of a cluster fetches its half, not the model.
"""
from __future__ import annotations

import json
from pathlib import Path

from k2mlx.errors import K2Error

from .shards import INDEX, SIDE_PATTERNS, allow_patterns


def parse_layers(spec: str | None, num_layers: int | None = None) -> range | None:
    """'a:b' -> range(a, b) (b exclusive, like a Python slice); 'a:' runs to the last layer."""
    if spec is None:
        return None
    try:
        a, b = spec.split(":")
        start = int(a) if a.strip() else 0
        if b.strip():
            stop = int(b)
        elif num_layers is not None:
            stop = num_layers
        else:
            raise ValueError
    except ValueError:
        raise K2Error(f"--layers must look like START:STOP (e.g. 0:31), got {spec!r}") from None
    if not 0 <= start < stop or (num_layers is not None and stop > num_layers):
        limit = f" (the model has {num_layers} layers)" if num_layers is not None else ""
        raise K2Error(f"--layers {spec} is not a valid layer range{limit}")
    return range(start, stop)


def patterns_for(config: dict, weight_map: dict, layers: range | None) -> list[str]:
    """allow_patterns for one stage, from the repo's config.json and index (no network)."""
    text = {**config, **(config.get("text_config") or {})}
    n = int(text["num_hidden_layers"])
    if layers is None:
        return SIDE_PATTERNS + sorted(set(weight_map.values()))
    if layers.stop > n:
        raise K2Error(f"layers {layers.start}:{layers.stop} exceed the model's {n} layers")
    return allow_patterns(weight_map, layers, num_layers=n, tied=bool(text.get("tie_word_embeddings", False)))


def _hub_error(repo: str, e: Exception) -> K2Error:
    return K2Error(
        f"cannot download {repo} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        "Check the network and the repo name; HF_HUB_OFFLINE=1 forbids downloads; gated repos need "
        "`huggingface-cli login` or HF_TOKEN.")


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached, or None. Checked once up front so that an offline machine
    gets one line at once instead of huggingface_hub's five logged retries (~25 s)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let huggingface_hub try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=5).close()
    except OSError as e:
        return f"cannot reach {url.hostname} ({e.strerror or e})"
    return None


def download(repo: str, layers: range | str | None = None, out: str | Path | None = None,
             revision: str | None = None, progress: bool = True) -> Path:
    """Fetch `repo` (or the part of it a stage owning `layers` needs); returns the local folder."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise K2Error("huggingface_hub is not installed (pip install huggingface_hub)") from e
    if isinstance(layers, str) and not layers.rstrip().endswith(":"):
        parse_layers(layers)  # a malformed range fails before any network traffic
    kw = {"revision": revision}
    if out is not None:
        kw["local_dir"] = str(out)
    offline = _hub_unreachable()
    if offline:  # files already in the cache (or --out) still do
        kw["local_files_only"] = True
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json", **kw)).read_text())
        text = {**config, **(config.get("text_config") or {})}
        if isinstance(layers, str):
            layers = parse_layers(layers, int(text["num_hidden_layers"]))
        try:
            index_file = hf_hub_download(repo, INDEX, **kw)
            weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        except Exception as e:  # single-file repos have no index
            if "404" not in str(e) and "EntryNotFound" not in type(e).__name__:
                raise
            weight_map = {"*": "*.safetensors"}
        patterns = patterns_for(config, weight_map, layers) if "*" not in weight_map else SIDE_PATTERNS + ["*.safetensors"]
        path = snapshot_download(repo, allow_patterns=patterns, **kw)
    except K2Error:
        raise
    except Exception as e:  # offline, DNS, HTTP 401/404, ...: one clear message
        if offline:
            raise K2Error(f"cannot download {repo}: {offline}, and it is not in the local Hugging Face cache"
                          f"{' or ' + str(out) if out is not None else ''}. Connect to the network, or "
                          "download it elsewhere and pass the folder with --model") from e
        raise _hub_error(repo, e) from e
    # the same check --model runs (k2mlx.loading.resolve): every shard this stage needs is here
    from .resolve import missing_files

    missing = missing_files(Path(path), layers if isinstance(layers, range) else None)
    if missing:
        raise K2Error(f"{repo}: {len(missing)} shard file(s) are still missing after the download (first: "
                      f"{missing[0]}) in {path}; run the same command again to resume")
    return Path(path)
