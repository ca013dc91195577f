"""Import graph: leaf modules stay leaves (no engine, no MLX, no mlx-lm behind them)."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("k2mlx.engine", "mlx", "mlx_lm", "transformers")


def _modules_after(stmt: str) -> list[str]:
    code = f"import sys, json\n{stmt}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def _heavy(mods: list[str]) -> list[str]:
    return [m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_chat_package_imports_no_engine_and_no_mlx():
    assert _heavy(_modules_after("import k2mlx.chat; from k2mlx.chat import parser, template")) == []


def test_events_is_a_leaf():
    mods = _modules_after("import k2mlx.events")
    assert [m for m in mods if m.startswith("k2mlx.") and m != "k2mlx.events"] == []
    assert _heavy(mods) == []


def test_old_events_path_is_the_same_classes():
    import k2mlx.engine.events as old
    import k2mlx.events as new

    for name in new.__all__:
        assert getattr(old, name) is getattr(new, name)
