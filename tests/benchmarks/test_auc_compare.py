"""The BCE vs AUC-margin comparison's arms and its summary over seeds (the training itself is
the pipeline's, tested elsewhere; the script's measured table is in docs/EXPERIMENTS.md)."""
from __future__ import annotations

import auc_compare
import pytest
import yaml
from pipeline_bench import with_sets

from chexops.config import params_from_dict
from tests.pipeline_repo import REPO


def test_every_arm_is_valid_params_and_differs_only_in_round_two_loss_settings():
    plan = auc_compare.arms([0.01])
    assert list(plan) == ["bce", "auc_margin", "auc_margin_lr0.01"]
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    loaded = {name: params_from_dict(with_sets(base, sets)) for name, sets in plan.items()}
    assert [loaded[n].rounds["r2"].loss for n in plan] == ["bce", "auc_margin", "auc_margin"]
    assert loaded["auc_margin"].train.auc_margin.lr == base["train"]["auc_margin"]["lr"]
    assert loaded["auc_margin_lr0.01"].train.auc_margin.lr == pytest.approx(0.01)
    # round 1 is the same BCE round in every arm: the arms are paired
    assert {loaded[n].rounds["r1"].loss or loaded[n].train.loss for n in plan} == {"bce"}


def seed(test: dict[str, float], diffs: dict[str, tuple[float, float]]) -> dict:
    return {"arms": {k: {"test_auroc": v} for k, v in test.items()},
            "delong_minus_bce": {k: {"diff": d, "p_value": p} for k, (d, p) in diffs.items()}}


def test_summary_counts_better_and_significant_seeds_per_arm():
    seeds = [seed({"bce": 0.90, "auc_margin": 0.92}, {"auc_margin": (0.02, 0.01)}),
             seed({"bce": 0.90, "auc_margin": 0.91}, {"auc_margin": (0.01, 0.40)}),
             seed({"bce": 0.92, "auc_margin": 0.89}, {"auc_margin": (-0.03, 0.001)})]
    out = auc_compare.summary(seeds)
    assert out["bce"] == {"mean_test_auroc": pytest.approx(0.9066667)}
    assert out["auc_margin"] == {"mean_test_auroc": pytest.approx(0.9066667), "mean_diff": pytest.approx(0.0),
                                 "seeds_better": 2, "seeds_significantly_better": 1,
                                 "seeds_significantly_worse": 1}
