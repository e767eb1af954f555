"""The third-party modules a script needs: its imports and those of every module it reaches in
its own folder or in the chexops package, followed through the source with `ast` (nothing is
imported, so it runs where those modules are missing). Each use is module-level (needed to import
the module) or lazy (inside a function: needed when that function runs); `if TYPE_CHECKING:`
blocks are not imports.

    python benchmarks/closure.py benchmarks/gpu_phases.py   # one line per third-party module
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "chexops"
# import name -> pip distribution, where they differ (for the message naming what is missing)
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml",
                "huggingface_hub": "huggingface-hub"}


@dataclass(frozen=True)
class Use:
    importer: str   # the chexops module or script that imports it
    lazy: bool      # only inside a function


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(tree: ast.AST, module: str, lazy: bool = False) -> list[tuple[str, bool]]:
    """(dotted name, lazy) of every import under `tree`; `from a import b` gives a and a.b (b may
    be a submodule). Relative imports are resolved against `module`."""
    found: list[tuple[str, bool]] = []
    for node in ast.iter_child_nodes(tree):
        if _type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            found += [(base, lazy)] + [(f"{base}.{a.name}", lazy) for a in node.names]
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        found += imports(node, module, inner)
    return found


def _source(name: str, local: Path) -> Path | None:
    """The file of a chexops module or of a module beside the entry scripts; None otherwise."""
    parts = name.split(".")
    base = SRC if parts[0] == PACKAGE else local
    path = base.joinpath(*parts)
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def third_party(entries: list[Path]) -> dict[str, list[Use]]:
    """{top-level third-party module: its uses} over the closure of `entries` (script files)."""
    local = entries[0].resolve().parent
    todo: list[tuple[str, Path, bool]] = [(p.stem, p.resolve(), False) for p in entries]
    done: dict[str, bool] = {}     # module -> reached lazily only
    uses: dict[str, set[Use]] = {}
    while todo:
        module, path, lazy = todo.pop()
        if module in done and (not done[module] or lazy):
            continue
        done[module] = lazy
        parents = module.split(".")[:-1]
        todo += [(p, src, lazy) for p in (".".join(parents[:i + 1]) for i in range(len(parents)))
                 if (src := _source(p, local)) is not None]
        for name, inner in imports(ast.parse(path.read_text()), module):
            top = name.split(".")[0]
            src = _source(name, local)
            if src is not None:
                todo.append((name, src, lazy or inner))
            elif top != PACKAGE and _source(top, local) is None and top not in sys.stdlib_module_names \
                    and top != "__future__":
                uses.setdefault(top, set()).add(Use(module, lazy or inner))
    eager = {(top, u.importer) for top, us in uses.items() for u in us if not u.lazy}
    return {top: sorted((u for u in us if not (u.lazy and (top, u.importer) in eager)),
                        key=lambda x: (x.lazy, x.importer)) for top, us in sorted(uses.items())}


def describe(found: dict[str, list[Use]]) -> list[str]:
    """One line per module: its pip name, then who imports it (module-level first)."""
    lines = []
    for top, uses in found.items():
        level = [u.importer for u in uses if not u.lazy]
        lazy = [u.importer for u in uses if u.lazy]
        where = ", ".join(level) + ("; " if level and lazy else "") + \
            (f"lazy: {', '.join(lazy)}" if lazy else "")
        pip = DISTRIBUTION.get(top, top)
        lines.append(f"{top}{f' (pip {pip})' if pip != top else ''}: {where}")
    return lines


if __name__ == "__main__":
    print("\n".join(describe(third_party([Path(a) for a in sys.argv[1:]]))))
