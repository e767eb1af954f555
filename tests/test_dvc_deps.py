"""dvc.yaml declares every module a stage's code runs, so that DVC re-runs the stage when any of
them changes (a stale output after a code fix is how the seed study lost track of its trials).

The stage's entry module and everything it imports from chexops, transitively (including the
imports inside functions), must be a dep; only modules that cannot change a stage's outputs are
exempt: the CLI dispatcher, MLflow logging and the error type.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
ENTRY = {"source-fingerprint": "chexops.stages.source_fingerprint",
         "download": "chexops.stages.download", "clean": "chexops.stages.clean",
         "resample": "chexops.stages.resample", "train-round": "chexops.stages.train_round",
         "evaluate": "chexops.stages.evaluate"}
# report-only code: a training round must never depend on it (editing a figure retrains nothing)
REPORT_ONLY = {"chexops.evaluation.figures", "chexops.evaluation.report",
               "chexops.evaluation.analysis", "chexops.inference.gradcam", "chexops.inference.tta",
               "chexops.stages.evaluate", "chexops.stages.evaluate_report",
               "chexops.commands.compare", "chexops.tracking.registry"}
# modules that only log or dispatch: changing them cannot change an output file
EXEMPT = {"chexops.cli", "chexops.tracking.runs", "chexops.errors"}


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(name: str) -> set[str]:
    """chexops modules imported anywhere in `name` (top level or inside functions)."""
    tree = ast.parse(module_file(name).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("chexops"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chexops"):
            found.add(node.module)
            # `from chexops import atomic` names a module, `from chexops.x import f` a function
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if module_file(f"{node.module}.{a.name}") is not None)
    # empty package __init__ files hold no code
    return {m for m in found if module_file(m) is not None and module_file(m).stat().st_size}


def closure(entry: str) -> set[str]:
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(name) - seen)
    return seen


def stage_entry(stage: str) -> str:
    return ENTRY["train-round" if stage.startswith("train-round-") else stage]


STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_every_module_it_runs(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    deps = {d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])}
    needed = {module_file(m).relative_to(REPO).as_posix()
              for m in closure(stage_entry(stage)) - EXEMPT}
    code_deps = {d for d in deps if d.startswith("src/")}
    assert not sorted(needed - code_deps), f"dvc.yaml stage {stage} lacks deps: {sorted(needed - code_deps)}"
    assert not sorted(code_deps - needed), (f"dvc.yaml stage {stage} lists code it never runs "
                                            f"(a change there would re-run it for nothing): "
                                            f"{sorted(code_deps - needed)}")


@pytest.mark.parametrize("stage", [s for s in STAGES if s.startswith("train-round-")])
def test_training_rounds_never_depend_on_report_code(stage):
    assert not closure(stage_entry(stage)) & REPORT_ONLY


def test_closure_follows_function_level_imports():
    # evaluate imports evaluate_report at top level, which imports Grad-CAM inside a function
    assert "chexops.inference.gradcam" in closure("chexops.stages.evaluate")
