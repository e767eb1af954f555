"""Every third-party module the package imports is declared in pyproject.toml, so a fresh
`pip install -e .` has it rather than getting it by luck through another package."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml",
                "huggingface_hub": "huggingface-hub"}


def imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"chexops", "__future__"}}


def declared() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in deps}


def test_every_third_party_import_is_a_declared_dependency():
    missing = sorted(n for n in imported_top_levels()
                     if DISTRIBUTION.get(n, n).lower().replace("_", "-") not in
                     {d.replace("_", "-") for d in declared()})
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"
