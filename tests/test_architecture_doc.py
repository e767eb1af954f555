"""docs/ARCHITECTURE.md lists every module of the package with its one-line job, so a newcomer
finds any module from the doc and the doc cannot silently fall behind the code."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_module_is_in_the_architecture_doc():
    doc = (REPO / "docs/ARCHITECTURE.md").read_text()
    modules = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "src/chexops").rglob("*.py"))
               if p.name != "__init__.py" or p.read_text().strip()]
    missing = [m for m in modules if f"`{m}`" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md lacks: {missing}"


def test_the_doc_names_no_module_that_is_gone():
    doc = (REPO / "docs/ARCHITECTURE.md").read_text()
    named = {w.strip("`") for w in doc.split() if w.startswith("`src/chexops/") and w.endswith(".py`")}
    gone = sorted(m for m in named if not (REPO / m).is_file())
    assert not gone, f"docs/ARCHITECTURE.md names modules that no longer exist: {gone}"
