"""The kernels package imports in one direction only: no module imports another that (directly,
or lazily inside a function) imports it back; and each module imports alone in a fresh
interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import k2mlx.kernels

PKG = Path(k2mlx.kernels.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def kernel_imports(module: str) -> set[str]:
    """Kernels modules `module` imports anywhere in its text (top level or inside functions)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "k2mlx.kernels":
                out |= {a.name for a in node.names}
            elif node.module.startswith("k2mlx.kernels."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("k2mlx.kernels.")}
    return out - {module}


def test_the_import_graph_has_no_cycle():
    graph = {m: kernel_imports(m) for m in MODULES}
    assert graph["launch"] <= {"cpp", "reference", "sources"}, graph["launch"]
    # the router module only runs its kernel: its unreachable MLX-ops fallback (and with it
    # the import of dispatch's policy) is gone; the layer's plan picks the router at load
    assert graph["router"] == {"launch"}, graph["router"]
    assert "policy" not in set().union(*(graph[m] for m in ("dispatch", "launch", "router", "checks")))
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    p = subprocess.run([sys.executable, "-c", f"import k2mlx.kernels.{module}"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
