"""The default profile (params.yaml as shipped) learns: `dvc repro` on synthetic CheXpert reaches a
validation AUROC well above chance and below the ceiling the hidden truth allows.

This is the promise the README's `make repro` makes; the reduced end-to-end test is too small to
check it. It trains DenseNet121 for 8 epochs at 64 px on CPU (about 5 minutes on 2 cores).
"""
from __future__ import annotations

import json

import pytest
import yaml

from tests.pipeline_repo import REPO, deep_update, make_repo_copy, pipeline_env, run

pytestmark = pytest.mark.slow

WELL_ABOVE_CHANCE = 0.70  # the two-core reference run reaches 0.87 (benchmarks/results/)


def test_default_profile_learns_cardiomegaly(tmp_path):
    # the shipped params, pinned to CPU so the figure is the CPU one wherever the test runs
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()),
                         {"runtime": {"device": "cpu"}})
    repo = make_repo_copy(tmp_path, params)
    run(["dvc", "repro"], repo, pipeline_env(), timeout=1500)
    result = json.loads((repo / "metrics/evaluate.json").read_text())["Cardiomegaly"]
    assert result["n"] >= 200  # the default validation split, not a toy
    assert WELL_ABOVE_CHANCE < result["auroc"] < result["ceiling_auroc"], result
    assert result["ci"]["auroc"]["lo"] > 0.5  # the whole 95 % interval clears chance
