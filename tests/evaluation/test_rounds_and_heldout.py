"""The rounds' learning-curve table and the held-out cohort's record, as pure functions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexops.evaluation import heldout, rounds


def history(aurocs, start: int = 0) -> pd.DataFrame:
    epochs = range(start, start + len(aurocs))
    return pd.DataFrame({"epoch": epochs, "train_loss": [0.4] * len(aurocs), "valid_loss": 0.5,
                         "auroc": aurocs})


def test_epochs_count_across_rounds_with_or_without_an_epoch_zero():
    scored = rounds.rounds_table({1: history([0.5, 0.6]), 2: history([0.6, 0.7, 0.65])})
    assert list(scored["step"]) == [0, 1, 1, 2, 3]          # round 2's epoch 0 = round 1's end
    assert list(scored.loc[scored["best"], "auroc"]) == [0.6, 0.7]
    seed = rounds.rounds_table({1: history([0.5, 0.6], 1), 2: history([0.7], 1)})
    assert list(seed["step"]) == [1, 2, 3]                   # the seed's rounds: epochs from 1
    assert rounds.rounds_table({}).empty
    assert rounds.rounds_figure(scored).axes[1].get_ylabel() == "AUROC"


def test_equal_epochs_mark_the_first_as_best_like_the_rounds():
    table = rounds.rounds_table({1: history([0.7, 0.7, 0.6])})
    assert list(table["best"]) == [True, False, False]


def test_heldout_record_gives_ci_ceiling_and_optimism():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, 300), 0, 1)
    metrics = {"Cardiomegaly": {"auroc": 0.95}}
    test = pd.DataFrame({"Path": [f"t/{i}.jpg" for i in range(300)], "Cardiomegaly": y})
    truth = pd.DataFrame({"Path": test["Path"], "ctr": 0.45 + 0.1 * y})
    heldout.add_heldout(metrics, test, p[:, None], ("Cardiomegaly",), 0.5, 1000, 0, truth)
    record = metrics["Cardiomegaly"]["test"]
    assert record["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert record["auroc_lo"] < record["auroc"] < record["auroc_hi"]
    assert record["optimism"] == pytest.approx(0.95 - record["auroc"])
    assert record["ceiling_auroc"] == 1.0 and record["n"] == 300


def test_heldout_record_of_one_class_says_why_and_has_no_optimism():
    record = heldout.heldout_record(np.zeros(5, dtype=int), np.full(5, 0.3), 0.5, 1000, 0, 0.9)
    assert record["auroc"] is None and record["optimism"] is None
    assert "test cohort holds only negative cases" in record["note"]


def test_several_targets_get_a_mean_test_record():
    test = pd.DataFrame({"Path": ["a", "b", "c", "d"], "A": [0, 1, 0, 1], "B": [1, 0, 1, 0]})
    metrics = {"A": {"auroc": 1.0}, "B": {"auroc": 0.5}, "mean": {"auroc": 0.75}}
    probs = np.array([[0.1, 0.9], [0.9, 0.1], [0.2, 0.8], [0.8, 0.3]])
    heldout.add_heldout(metrics, test, probs, ("A", "B"), 0.5, 1000, 0)
    assert metrics["mean"]["test"]["auroc"] == pytest.approx(1.0)
    assert metrics["mean"]["test"]["optimism"] == pytest.approx(np.mean([0.0, -0.5]))
