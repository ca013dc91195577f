"""Every touchpoint with mlx-lm (and the one private mlx.nn helper k2mlx uses), in one place.

k2mlx runs on mlx-lm's continuous batching (`BatchGenerator`, its `insert` keywords,
`StopSequences`), its caches (`KVCache`, `_BaseCache`, the LRU prompt cache and its trimming),
its sampling helpers and its attention masks. Several are internals whose names and keywords
change between releases (mlx-lm's main branch has renamed some already), so:

- nothing else in k2mlx, distributed/ or tui/ imports mlx_lm (tests/engine/test_mlxlm_adapter.py
  greps for it); benchmark scripts that run mlx-lm's own model as the peer are the exception;
- the tested range is `TESTED` (the same string pins mlx-lm in pyproject.toml);
- `require()` compares the installed signatures with what this module calls, once, when an
  engine starts, and raises one `DependencyError` naming every mismatch, instead of each
  request failing with a TypeError deep in a batch step.

Imports are lazy: importing anything from mlx_lm runs its package __init__, which imports
transformers (about 0.25 GB and seconds of start-up); `plan` and `convert` never need it.
"""
from __future__ import annotations

import functools
import inspect
import logging

from k2mlx.errors import K2Error

log = logging.getLogger(__name__)

TESTED = "mlx-lm>=0.32.2,<0.33"  # keep equal to pyproject.toml's pin (a test checks)


class DependencyError(K2Error):
    """An installed dependency lacks an interface k2mlx calls (a renamed internal)."""

    exit_code = 4


# ---------------------------------------------------------------- attention masks, caches

def create_attention_mask(h, cache=None, *, return_array: bool = False):
    from mlx_lm.models.base import create_attention_mask as f

    return f(h, cache, return_array=return_array)


def create_causal_mask(n: int, offset: int = 0, **kwargs):
    from mlx_lm.models.base import create_causal_mask as f

    return f(n, offset, **kwargs)


def KVCache():  # noqa: N802 (stands in for the class)
    """A fresh per-layer cache (mlx-lm's KVCache: merge/filter/extend for batching live on it)."""
    from mlx_lm.models.cache import KVCache as cls

    return cls()


def kv_cache_holding(keys, values):
    """A KVCache holding exactly these keys/values [B, H, T, D] (offset T, no spare capacity)."""
    c = KVCache()
    c.keys, c.values, c.offset = keys, values, int(keys.shape[2])
    return c


def kv_of(cache) -> tuple | None:
    """(keys, values) [B, H, offset, D] of a plain KVCache, or None for any other layer cache
    (a pipeline's stand-in for another rank's layer, a rotating or quantized cache)."""
    from mlx_lm.models.cache import KVCache as cls

    if type(cache) is not cls or cache.keys is None or cache.values is None or not isinstance(cache.offset, int):
        return None
    return cache.keys[..., :cache.offset, :], cache.values[..., :cache.offset, :]


def is_layer_cache(value) -> bool:
    """True for any of mlx-lm's per-layer cache objects (their common base is private)."""
    from mlx_lm.models.cache import _BaseCache

    return isinstance(value, _BaseCache)


def prompt_cache_lru(max_entries: int, max_bytes: int):
    """mlx-lm's LRU prompt cache (a token trie of extracted per-sequence caches).

    Methods used: fetch_nearest_cache(model_key, tokens) -> (cache | None, rest),
    insert_cache(model_key, tokens, cache), trim_to(n_bytes=), nbytes, len()."""
    from mlx_lm.models.cache import LRUPromptCache

    return LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)


def trim_prompt_cache(cache: list, n: int):
    from mlx_lm.models.cache import trim_prompt_cache as f

    return f(cache, n)


# ---------------------------------------------------------------- sampling helpers

def greedy_sampler(logprobs):
    from mlx_lm.sample_utils import greedy_sampler as f

    return f(logprobs)


def apply_top_p(logprobs, top_p: float):
    from mlx_lm.sample_utils import apply_top_p as f

    return f(logprobs, top_p)


def apply_min_p(logprobs, min_p: float):
    from mlx_lm.sample_utils import apply_min_p as f

    return f(logprobs, min_p)


def apply_top_k(logprobs, top_k: int):
    from mlx_lm.sample_utils import apply_top_k as f

    return f(logprobs, top_k)


def logit_bias_processors(logit_bias: dict | None) -> list:
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(logit_bias=logit_bias)


# ---------------------------------------------------------------- continuous batching

def batch_generator(model, *, max_batch: int, prefill_batch: int, prefill_step_size: int):
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator(model, completion_batch_size=max_batch, prefill_batch_size=prefill_batch,
                          prefill_step_size=prefill_step_size)


def insert(bg, prompt: list[int], *, max_tokens: int, cache, prefix: list[int], sampler, processors,
           stop_ids) -> int:
    """Add one sequence to a BatchGenerator; returns its uid. `prompt` is what still has to run,
    `prefix` the tokens `cache` already holds; every id in `stop_ids` ends the sequence."""
    from mlx_lm.generate import StopSequences

    (uid,) = bg.insert([prompt], max_tokens=[max_tokens], caches=[cache] if cache is not None else None,
                       all_tokens=[prefix], samplers=[sampler], logits_processors=[processors],
                       stop_sequences=[StopSequences([[t] for t in sorted(stop_ids)])])
    return uid


def step(bg) -> tuple[list, list]:
    """One `next()`: (prompt-processing responses, generation responses). A generation response
    has uid, token, logprobs [V], finish_reason, prompt_cache and all_tokens (the last two set
    when it finished)."""
    return bg.next()


def prompt_progress(responses) -> list[tuple[int, int, int]]:
    """(uid, prompt tokens processed so far, prompt tokens to process) of each prompt-processing
    response of `step` (the tokens passed to `insert`, not counting a cached prefix)."""
    return [(r.uid, int(r.progress[0]), int(r.progress[1])) for r in responses]


def remove(bg, uids: list[int], keep_caches: bool = False):
    """Drop sequences; with keep_caches -> {uid: (cache, all_tokens)}."""
    if keep_caches:
        return bg.remove(uids, return_prompt_caches=True)
    bg.remove(uids)
    return None


# ---------------------------------------------------------------- mlx.nn private helper

def quant_defaults(mode: str, group_size: int | None, bits: int | None) -> tuple[int, int]:
    """(group_size, bits) with mlx's defaults for `mode` filled in (mlx.nn has no public API)."""
    from mlx.nn.layers.quantized import _defaults_for_mode

    return _defaults_for_mode(mode, group_size, bits)


# ---------------------------------------------------------------- start-up check

def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _expect(problems: list, what: str, getter, names: tuple = ()) -> None:
    """Record a problem unless `getter()` resolves to something callable taking `names`."""
    try:
        obj = getter()
    except (ImportError, AttributeError) as e:
        problems.append(f"{what} is missing ({e})")
        return
    if names:
        try:
            have = _params(obj)
        except (TypeError, ValueError):
            problems.append(f"{what} has no inspectable signature")
            return
        lacking = [n for n in names if n not in have]
        if lacking:
            problems.append(f"{what} takes no {', '.join(lacking)}")


def problems() -> list[str]:
    """Every interface this module calls that the installed mlx-lm/mlx lacks (empty: all there)."""
    import dataclasses
    import importlib

    def attr(mod: str, *path: str):
        def get():
            obj = importlib.import_module(mod)
            for p in path:
                obj = getattr(obj, p)
            return obj
        return get

    out: list[str] = []
    g, c, s, b = "mlx_lm.generate", "mlx_lm.models.cache", "mlx_lm.sample_utils", "mlx_lm.models.base"
    _expect(out, "BatchGenerator", attr(g, "BatchGenerator"),
            ("model", "completion_batch_size", "prefill_batch_size", "prefill_step_size"))
    _expect(out, "BatchGenerator.insert", attr(g, "BatchGenerator", "insert"),
            ("prompts", "max_tokens", "caches", "all_tokens", "samplers", "logits_processors", "stop_sequences"))
    _expect(out, "BatchGenerator.remove", attr(g, "BatchGenerator", "remove"), ("uids", "return_prompt_caches"))
    _expect(out, "BatchGenerator.next", attr(g, "BatchGenerator", "next"))
    _expect(out, "StopSequences", attr(g, "StopSequences"), ("stop_sequences",))
    for cls, wanted in (("GenerationBatch", {"uid", "token", "logprobs", "finish_reason", "prompt_cache",
                                             "all_tokens"}),
                        ("PromptProcessingBatch", {"uid", "progress"})):  # what step() hands back
        try:
            fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(g), cls).Response)}
        except (ImportError, AttributeError, TypeError) as e:
            out.append(f"{cls}.Response is missing ({e})")
            continue
        if wanted - fields:
            out.append(f"{cls}.Response has no {', '.join(sorted(wanted - fields))}")
    _expect(out, "KVCache", attr(c, "KVCache"))
    try:
        fresh = importlib.import_module(c).KVCache()
        lacking = [a for a in ("keys", "values", "offset") if not hasattr(fresh, a)]
        if lacking:
            out.append(f"KVCache has no {', '.join(lacking)}")
    except (ImportError, AttributeError, TypeError) as e:
        out.append(f"KVCache() failed ({e})")
    _expect(out, "_BaseCache", attr(c, "_BaseCache"))
    _expect(out, "LRUPromptCache", attr(c, "LRUPromptCache"), ("max_size", "max_bytes"))
    _expect(out, "LRUPromptCache.fetch_nearest_cache", attr(c, "LRUPromptCache", "fetch_nearest_cache"),
            ("model", "tokens"))
    _expect(out, "LRUPromptCache.insert_cache", attr(c, "LRUPromptCache", "insert_cache"),
            ("model", "tokens", "prompt_cache"))
    _expect(out, "LRUPromptCache.trim_to", attr(c, "LRUPromptCache", "trim_to"), ("n_bytes",))
    _expect(out, "trim_prompt_cache", attr(c, "trim_prompt_cache"), ("cache", "num_tokens"))
    _expect(out, "create_attention_mask", attr(b, "create_attention_mask"), ("h", "cache", "return_array"))
    _expect(out, "create_causal_mask", attr(b, "create_causal_mask"), ("N", "offset"))
    for name, args in (("greedy_sampler", ()), ("apply_top_p", ("top_p",)), ("apply_min_p", ("min_p",)),
                       ("apply_top_k", ("top_k",)), ("make_logits_processors", ("logit_bias",))):
        _expect(out, name, attr(s, name), args)
    _expect(out, "mlx.nn.layers.quantized._defaults_for_mode",
            attr("mlx.nn.layers.quantized", "_defaults_for_mode"), ("mode", "group_size", "bits"))
    return out


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def require() -> None:
    """Raise one DependencyError if the installed mlx-lm lacks anything k2mlx calls; log a
    warning when it is outside the tested range but compatible. Checked once per process."""
    from packaging.requirements import Requirement

    ver = installed_version()
    if ver is None:
        raise DependencyError(f"mlx-lm is not installed; k2mlx needs {TESTED} (pip install '{TESTED}')")
    bad = problems()
    if bad:
        raise DependencyError(f"mlx-lm {ver} does not have the interfaces k2mlx calls (tested: {TESTED}): "
                              f"{'; '.join(bad)}. Install a tested version: pip install '{TESTED}'")
    if not Requirement(TESTED).specifier.contains(ver, prereleases=True):
        log.warning("mlx-lm %s is outside the tested range %s; its interfaces match, but results are unverified",
                    ver, TESTED)
