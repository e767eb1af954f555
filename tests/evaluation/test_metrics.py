"""metrics.py: the seed study's table at a threshold, undefined AUROC, curves."""
from __future__ import annotations

import numpy as np
import pytest

from chexops.evaluation.metrics import binary_metrics, multi_target_metrics


def test_binary_metrics_known_values():
    y = [0, 0, 0, 1, 1, 1, 1, 0]
    p = [0.1, 0.6, 0.2, 0.9, 0.4, 0.7, 0.8, 0.3]
    m = binary_metrics(y, p)
    # predicted positive: .6 (fp), .9 .7 .8 (tp); .4 is a missed positive (fn)
    assert m["confusion"] == [[3, 1], [1, 3]]
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["error_rate"] == pytest.approx(0.25) and m["accuracy"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx(15 / 16)
    assert (m["n"], m["n_pos"]) == (8, 4)


def test_one_class_gives_none_auroc_and_no_division_error():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert m["auroc"] is None
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["specificity"] == 1.0
    assert m["confusion"] == [[3, 0], [0, 0]]


def test_threshold_is_respected():
    assert binary_metrics([0, 1], [0.3, 0.4], threshold=0.35)["confusion"] == [[1, 0], [0, 1]]


def test_multi_target_masks_and_macro_mean():
    y = np.array([[0, 1], [1, 0], [0, 1], [1, 1]])
    p = np.array([[0.1, 0.9], [0.9, 0.2], [0.2, 0.1], [0.8, 0.7]])
    mask = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=bool)
    out = multi_target_metrics(y, p, ("A", "B"), mask)
    assert out["targets"]["A"]["auroc"] == 1.0
    assert out["targets"]["B"]["n"] == 3          # the masked row is left out
    assert out["targets"]["B"]["auroc"] == 1.0
    assert out["mean_auroc"] == 1.0
