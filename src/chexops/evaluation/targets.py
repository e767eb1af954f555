"""Evaluation as pure functions: per-target metrics, curves and the synthetic ceiling.

Inputs are arrays and frames; nothing here reads or writes files (stages/evaluate.py does).
An empty validation split, or one holding a single class, makes AUROC undefined: the record
says so in a `note` (auroc null) instead of failing the stage.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

# Where the synthetic truth side file keeps the latent score of a target; first match wins.
# data/synthetic.py writes one row per image (`Path`) with the cardiothoracic ratio; a generic
# `<target>_score` column works for any target.
TRUTH_SCORE_COLUMNS = {"Cardiomegaly": ("ctr", "cardiothoracic_ratio", "Cardiomegaly_ratio")}

# per-target scalar metrics that the multi-target `mean` record averages (macro, skipping None)
MEAN_KEYS = ("auroc", "ceiling_auroc", "precision", "recall", "specificity", "error_rate",
             "accuracy", "optimism", "ceiling_fraction")
NESTED = ("tta", "test")   # records inside a target's: test-time augmentation, held-out test cohort


def plain(obj: Any) -> Any:
    """NumPy scalars/arrays -> Python values, so JSON writes numbers, not strings."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def valid_labels(df: pd.DataFrame, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows with a 0/1 label, those labels); validation labels should all be 0/1."""
    labels = pd.to_numeric(df[target], errors="coerce").to_numpy()
    mask = np.isin(labels, (0, 1))
    return mask, labels[mask].astype(int)


def target_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, Any]:
    """binary_metrics plus a `note` when AUROC is undefined (no rows, or one class only)."""
    from chexops.evaluation.metrics import binary_metrics

    n, n_pos = len(y_true), int(np.sum(y_true))
    if n == 0:
        return {"auroc": None, "n": 0, "n_pos": 0, "threshold": threshold,
                "note": "validation split is empty: no metric can be computed"}
    record = plain(binary_metrics(y_true, y_prob, threshold=threshold))
    record["threshold"] = threshold
    if n_pos in (0, n):
        record["auroc"] = None
        kind = "positive" if n_pos == n else "negative"
        record["note"] = f"validation split holds only {kind} cases: AUROC is undefined"
    return record


def roc_frame(y_true: np.ndarray, y_prob: np.ndarray) -> pd.DataFrame:
    """ROC curve points (fpr, tpr); empty when one class is missing."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y_true)) < 2:
        return pd.DataFrame({"fpr": [], "tpr": []})
    fpr, tpr, _ = roc_curve(y_true, y_prob)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr})


def pr_frame(y_true: np.ndarray, y_prob: np.ndarray) -> pd.DataFrame:
    """Precision-recall curve points (recall, precision); empty without positives."""
    from sklearn.metrics import precision_recall_curve

    if len(y_true) == 0 or int(np.sum(y_true)) == 0:
        return pd.DataFrame({"recall": [], "precision": []})
    precision, recall, _ = precision_recall_curve(y_true, y_prob)
    return pd.DataFrame({"recall": recall, "precision": precision})


def confusion_frame(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> pd.DataFrame:
    """One row per image, (actual, predicted): what DVC's confusion template reads."""
    predicted = (np.asarray(y_prob) >= threshold).astype(int)
    return pd.DataFrame({"actual": np.asarray(y_true, dtype=int), "predicted": predicted})


def truth_score_column(truth: pd.DataFrame, target: str) -> str | None:
    """The truth table's latent score for `target`, or None when it has none."""
    for column in (*TRUTH_SCORE_COLUMNS.get(target, ()), f"{target}_score"):
        if column in truth.columns:
            return column
    return None


def ceiling_auroc(truth: pd.DataFrame, paths: pd.Series, y_true: np.ndarray,
                  target: str) -> float | None:
    """AUROC of the true latent score against the validation labels: the best any model can do.

    None when the truth has no score for `target`, misses images, or the labels hold one class.
    """
    from sklearn.metrics import roc_auc_score

    column = truth_score_column(truth, target)
    if column is None or len(np.unique(y_true)) < 2:
        return None
    scores = truth.drop_duplicates("Path").set_index("Path")[column].reindex(paths.to_numpy())
    if scores.isna().any():
        return None
    return float(roc_auc_score(y_true, scores.to_numpy(dtype=float)))


def evaluate_targets(df: pd.DataFrame, probs: np.ndarray, targets: tuple[str, ...],
                     threshold: float, truth: pd.DataFrame | None = None
                     ) -> tuple[dict[str, Any], dict[str, dict[str, pd.DataFrame]]]:
    """(metrics per target, curves per target {roc, pr, confusion}) for one validation split."""
    metrics: dict[str, Any] = {}
    curves: dict[str, dict[str, pd.DataFrame]] = {}
    for j, target in enumerate(targets):
        mask, y_true = valid_labels(df, target)
        y_prob = np.asarray(probs, dtype=float).reshape(len(df), len(targets))[mask, j]
        record = target_metrics(y_true, y_prob, threshold)
        if truth is not None:
            record["ceiling_auroc"] = ceiling_auroc(truth, df["Path"][mask], y_true, target)
        metrics[target] = record
        curves[target] = {"roc": roc_frame(y_true, y_prob), "pr": pr_frame(y_true, y_prob),
                          "confusion": confusion_frame(y_true, y_prob, threshold)}
    if len(targets) > 1:
        metrics["mean"] = mean_metrics([metrics[t] for t in targets])
    return metrics, curves


def mean_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Macro mean over targets of every per-target scalar metric (MEAN_KEYS), each over the
    targets where it is defined (None where it is nowhere); the nested `tta` (test-time
    augmentation) and `test` (held-out cohort) records are averaged the same way."""
    out: dict[str, Any] = {}
    for key in MEAN_KEYS:
        present = [r[key] for r in records if key in r]
        if not present:
            continue
        defined = [float(v) for v in present if v is not None]
        out[key] = float(np.mean(defined)) if defined else None
    for key in NESTED:
        nested = [r[key] for r in records if isinstance(r.get(key), dict)]
        if nested:
            out[key] = mean_metrics(nested)
            views = {r.get("views") for r in nested} - {None}
            if len(views) == 1:
                out[key]["views"] = views.pop()
    return out


HEADLINE = ("auroc", "auroc_lo", "auroc_hi")   # AUROC and its bootstrap 95 % interval


def headline_first(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics/evaluate.json's key order: the multi-target `mean` record, then each target's;
    in every record (nested ones too) AUROC and its 95 % interval first, the rest by name. DVC
    keeps this order for its columns, so `dvc exp show` opens with the trial's result."""
    def ordered(record: Any) -> Any:
        if not isinstance(record, dict):
            return record
        head = [k for k in HEADLINE if k in record]
        return {k: ordered(record[k]) for k in [*head, *sorted(set(record) - set(head))]}

    return {k: ordered(metrics[k]) for k in sorted(metrics, key=lambda k: k != "mean")}


def stack_curves(curves: dict[str, dict[str, pd.DataFrame]], kind: str) -> pd.DataFrame:
    """One plot table over targets; a `target` column only when there are several."""
    frames = [c[kind].assign(target=t) if len(curves) > 1 else c[kind] for t, c in curves.items()]
    return pd.concat(frames, ignore_index=True)


def slug(name: str) -> str:
    """A target name as a file-name part: "Pleural Effusion" -> "pleural-effusion"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
