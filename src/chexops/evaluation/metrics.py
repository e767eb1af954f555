"""Binary classification metrics at a threshold (the seed study's table) and curve points.

AUROC is None, not an exception, when the labels hold one class only; divisions by zero
(no predicted positives, no positives) give 0.0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def auroc(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class (or no row) is present."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, y_prob))


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    """[[tn, fp], [fn, tp]] (sklearn's layout for labels 0, 1)."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=[0, 1])
    return [[int(v) for v in row] for row in cm]


def binary_metrics(y_true: Sequence[float] | np.ndarray, y_prob: Sequence[float] | np.ndarray,
                   threshold: float = 0.5) -> dict[str, Any]:
    """auroc, precision, recall, specificity, error_rate, accuracy, confusion, n, n_pos."""
    truth = np.asarray(y_true).astype(int).ravel()
    prob = np.asarray(y_prob, dtype=float).ravel()
    if truth.shape != prob.shape:
        raise ValueError(f"y_true has {truth.size} values, y_prob {prob.size}")
    y_pred = (prob >= threshold).astype(int)
    (tn, fp), (fn, tp) = cm = confusion(truth, y_pred)
    n = len(truth)
    return {
        "auroc": auroc(truth, prob),
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "error_rate": _safe_div(fp + fn, n),
        "accuracy": _safe_div(tp + tn, n),
        "confusion": cm,
        "n": int(n),
        "n_pos": int(truth.sum()),
    }


def multi_target_metrics(y_true: np.ndarray, y_prob: np.ndarray, targets: Sequence[str],
                         mask: np.ndarray | None = None,
                         threshold: float = 0.5) -> dict[str, Any]:
    """{target: binary_metrics} over each target's unmasked rows, plus `mean_auroc` (macro mean
    over targets whose AUROC is defined; None when none is)."""
    y_true = np.asarray(y_true).reshape(len(y_true), -1)
    y_prob = np.asarray(y_prob).reshape(len(y_prob), -1)
    mask = np.ones_like(y_true, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    per = {t: binary_metrics(y_true[mask[:, j], j], y_prob[mask[:, j], j], threshold)
           for j, t in enumerate(targets)}
    defined = [m["auroc"] for m in per.values() if m["auroc"] is not None]
    return {"targets": per, "mean_auroc": float(np.mean(defined)) if defined else None}
