"""The package is layered: every chexops import (module level or inside a function) points to
the same layer or one below it, and the import graph has no cycle. A newcomer can then tell
from a module's folder what it may touch, and a training stage never depends on report code.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module may import its own layer or any layer before it
LAYERS: list[tuple[str, ...]] = [
    ("chexops.errors", "chexops.redact", "chexops.paths", "chexops.config", "chexops.atomic",
     "chexops.hashing", "chexops.runtime"),
    ("chexops.data",),
    ("chexops.model",),
    ("chexops.evaluation",),
    ("chexops.inference",),
    ("chexops.tracking",),
    ("chexops.training",),
    ("chexops.tuning",),
    ("chexops.stages", "chexops.commands"),
    ("chexops.cli", "chexops.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """chexops modules `name` imports anywhere in its body (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("chexops."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chexops"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(subs or {node.module})
    return {m for m in found if m in MODULES and m != name}


def layer_of(name: str) -> int:
    if name == "chexops":  # the package root holds only __version__: the base layer
        return 0
    for i, layer in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in layer):
            return i
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "chexops":
            layer_of(name)


def test_imports_run_downward_only():
    upward = [f"{name} -> {dep}" for name in sorted(MODULES) if name != "chexops"
              for dep in sorted(imports_of(name)) if layer_of(dep) > layer_of(name)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
