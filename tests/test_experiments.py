"""docs/EXPERIMENTS.md: every documented `dvc exp run -S ...` parses with DVC's own override
parser (Hydra grammar) and gives a params.yaml that chexops accepts."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

import yaml

from chexops.config import load_params, to_dict

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "EXPERIMENTS.md"


def documented_runs() -> list[list[str]]:
    """The -S overrides of each `dvc exp run` line in the doc's code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    runs = []
    for line in (ln for b in blocks for ln in b.splitlines()):
        if line.startswith("dvc exp run"):
            args = shlex.split(line)
            runs.append([args[i + 1] for i, a in enumerate(args) if a in ("-S", "--set-param")])
    return runs


def test_the_doc_covers_the_five_uncertainty_approaches():
    overrides = {o for run in documented_runs() for o in run}
    for policy in ("ignore", "zeros", "ones", "multiclass", "selftrained"):
        assert f"clean.default_uncertainty={policy}" in overrides
    assert len(documented_runs()) >= 10


@pytest.mark.parametrize("overrides", documented_runs(), ids=lambda o: " ".join(o)[:60])
def test_documented_overrides_parse_and_validate(overrides, tmp_path):
    from dvc.utils.hydra import apply_overrides

    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    apply_overrides(str(target), overrides)
    params = load_params(target)
    assert params.runtime.distributed == "off"  # DVC rewrites "off" unquoted: YAML 1.1 false
    for override in overrides:  # the override reached the typed params
        key, value = override.lstrip("+").split("=", 1)
        got = params
        for part in key.split("."):
            got = got[part] if isinstance(got, dict) else getattr(got, part)
        assert to_dict(got) == yaml.safe_load(value), override
