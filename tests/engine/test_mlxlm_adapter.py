"""The one mlx-lm adapter: nothing else imports mlx_lm, the pin is the tested range, the installed
signatures are what the adapter calls, and a renamed internal fails at engine start-up in one
message (not per request)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from k2mlx import mlxlm_adapter as adapter

ROOT = Path(__file__).resolve().parents[2]
IMPORT = re.compile(r"^\s*(from\s+mlx_lm[\s.]|import\s+mlx_lm\b)|mlx\.nn\.layers\.\w+ import _", re.M)


def test_only_the_adapter_imports_mlx_lm():
    offenders = []
    for top in ("k2mlx", "distributed", "tui"):
        for p in sorted((ROOT / top).rglob("*.py")):
            if p.name == "mlxlm_adapter.py":
                continue
            if IMPORT.search(p.read_text()):
                offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []


def test_pin_is_the_tested_range_and_installed_version_is_in_it():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if Requirement(d).name == "mlx-lm"]
    assert [str(Requirement(p).specifier) for p in pins] == [str(Requirement(adapter.TESTED).specifier)]
    assert Requirement(adapter.TESTED).specifier.contains(adapter.installed_version())


def test_installed_signatures_match_what_the_adapter_calls():
    assert adapter.problems() == []
    adapter.require()


def test_a_renamed_insert_keyword_fails_engine_start_in_one_message(monkeypatch, tiny_checkpoint):
    """mlx-lm main renamed internals: the engine refuses to start, naming each mismatch."""
    from mlx_lm.generate import BatchGenerator

    from k2mlx import load
    from k2mlx.engine import Engine

    model, tok = load(tiny_checkpoint)

    def insert(self, prompts, max_tokens=None, caches=None, all_tokens=None, samplers=None,
               logits_processors=None, stop_criteria=None):  # stop_sequences renamed
        raise AssertionError("never reached")

    monkeypatch.setattr(BatchGenerator, "insert", insert)
    adapter.require.cache_clear()
    try:
        with pytest.raises(adapter.DependencyError) as e:
            Engine(model, tok, max_batch=1, cache_bytes=0)
    finally:
        adapter.require.cache_clear()
    msg = str(e.value)
    assert "BatchGenerator.insert takes no stop_sequences" in msg and adapter.TESTED in msg
    assert "\n" not in msg


def test_a_missing_private_cache_base_is_reported(monkeypatch):
    import mlx_lm.models.cache as cache

    monkeypatch.delattr(cache, "_BaseCache")
    assert any(p.startswith("_BaseCache is missing") for p in adapter.problems())


def test_outside_the_tested_range_warns_but_runs(monkeypatch, caplog):
    monkeypatch.setattr(adapter, "installed_version", lambda: "0.40.0")
    adapter.require.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="k2mlx.mlxlm_adapter"):
            adapter.require()
    finally:
        adapter.require.cache_clear()
    assert "outside the tested range" in caplog.text


def test_a_renamed_response_field_is_reported(monkeypatch):
    import dataclasses

    from mlx_lm.generate import PromptProcessingBatch

    @dataclasses.dataclass
    class Response:  # mlx-lm renaming `progress` would break prefill progress per request
        uid: int
        done_total: tuple

    monkeypatch.setattr(PromptProcessingBatch, "Response", Response)
    assert "PromptProcessingBatch.Response has no progress" in adapter.problems()


def test_a_mismatch_fails_before_any_weight_is_read(monkeypatch, tiny_checkpoint):
    """load() checks first: a renamed internal is reported before minutes of loading a real K2."""
    import mlx_lm.models.cache as cache

    import k2mlx.loading as loading

    def never(*a, **k):
        raise AssertionError("weights were read before the mlx-lm check")

    monkeypatch.delattr(cache, "trim_prompt_cache")
    monkeypatch.setattr(loading, "load_model", never)
    adapter.require.cache_clear()
    try:
        with pytest.raises(adapter.DependencyError, match="trim_prompt_cache is missing"):
            loading.load(tiny_checkpoint)
    finally:
        adapter.require.cache_clear()
