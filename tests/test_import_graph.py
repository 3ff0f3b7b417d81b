"""The package is a one-way stack: no import circle, and no module imports a layer above its own.

Every module of ``hf_compressssm`` is parsed (not imported); every import, including the lazy ones inside functions,
is an edge. Layers, bottom to top (a module may import its own layer and the layers below):

    models, metrics  <-  families  <-  compression  <-  trainer, hub, peft_utils  <-  the package root

The application (``scripts/compressssm_app``) sits above the package and is not part of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "hf_compressssm"
ROOT = "hf_compressssm"

#: Layer of each top-level subpackage / module of the package (a missing entry fails the test).
LAYERS = {
    "models": 0,
    "metrics": 0,
    "families": 1,
    "compression": 2,
    "trainer": 3,
    "hub": 3,
    "peft_utils": 3,
    "__init__": 4,
    "__main__": 4,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports (anywhere in the file: lazy imports inside functions count)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            # ``from . import x`` / ``from .pkg import x``: x may be a submodule
            targets = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            targets = targets or [target]
        for target in targets:
            if target == ROOT or target.startswith(ROOT + "."):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != module:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = "__init__" if len(parts) == 1 else parts[1]
    if key not in LAYERS:
        pytest.fail(f"{module}: declare the layer of {ROOT}.{key} in LAYERS of {Path(__file__).name}")
    return LAYERS[key]


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
        # a package's __init__ re-exports its own submodules; importing the root from below is still upward
        and not (target.startswith(module + ".") and module != ROOT)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ importing its own submodules is how a package exposes them, not a dependency back
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The walker resolves relative imports and finds imports inside functions."""
    graph = _graph()
    assert "hf_compressssm.families" in graph["hf_compressssm.compression.calibration"]
    assert "hf_compressssm.models.modeling_compressssm_hybrid" in graph["hf_compressssm.families.mamba2"]
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from ..families import x\n")
    assert _imports("hf_compressssm.compression.m", lazy, {"hf_compressssm.families"}) == {"hf_compressssm.families"}
