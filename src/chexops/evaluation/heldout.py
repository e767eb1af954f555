"""The held-out test cohort's record: what the final model scores on images that no epoch,
round, learning rate or trial was chosen on.

Validation selects (each round's best epoch, `chexops tune`'s objective), so its AUROC is an
optimistic estimate of the model's; the test cohort is scored once, by evaluate, and the gap
between the two (the selection optimism) is reported beside them. Pure: frames and arrays in,
JSON-able dicts out.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from chexops.evaluation import stats
from chexops.evaluation.targets import ceiling_auroc, mean_metrics, target_metrics, valid_labels

# the keys of the plain record kept for the test cohort (the rest are validation's business:
# the operating point and calibration are chosen and judged there)
KEYS = ("auroc", "n", "n_pos", "precision", "recall", "specificity", "error_rate", "threshold",
        "note")


def heldout_record(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int,
                   valid_auroc: float | None) -> dict[str, Any]:
    """One target's test record: AUROC with its 95 % stratified-bootstrap interval (percentile,
    seeded: chexops.evaluation.stats.bootstrap_ci), the metrics at `threshold`, and
    `optimism` = validation AUROC - test AUROC (None where either is undefined).

    y: (N,) 0/1 labels; p: (N,) probabilities."""
    plain = target_metrics(y, p, threshold)
    record = {k: plain[k] for k in KEYS if k in plain}
    if record.get("note"):
        record["note"] = record["note"].replace("validation split", "test cohort")
    auroc = record.get("auroc")
    ci = stats.bootstrap_ci(y, p, threshold, n_boot, seed)["auroc"] if auroc is not None else {}
    record["auroc_lo"], record["auroc_hi"] = ci.get("lo"), ci.get("hi")
    record["optimism"] = (None if auroc is None or valid_auroc is None
                          else float(valid_auroc) - float(auroc))
    return record


def add_heldout(metrics: dict[str, Any], test: pd.DataFrame, probs: np.ndarray,
                targets: tuple[str, ...], threshold: float, n_boot: int, seed: int,
                truth: pd.DataFrame | None = None) -> None:
    """metrics[<target>]['test'] for every target (validation's records must be in `metrics`):
    the record above plus, with the synthetic truth, the ceiling on the test cohort and the
    share of it reached (`ceiling_fraction`); several targets: their macro mean in
    metrics['mean']['test'].

    test: the held-out label table (N rows, `Path` and the target columns); probs: (N, targets)."""
    probs = np.asarray(probs, dtype=float).reshape(len(test), len(targets))
    for j, target in enumerate(targets):
        mask, y = valid_labels(test, target)
        record = heldout_record(y, probs[mask, j], threshold, n_boot, seed,
                                metrics[target].get("auroc"))
        if truth is not None:
            ceiling = ceiling_auroc(truth, test["Path"][mask], y, target)
            record["ceiling_auroc"] = ceiling
            record["ceiling_fraction"] = (record["auroc"] / ceiling
                                          if ceiling and record.get("auroc") is not None else None)
        metrics[target]["test"] = record
    if len(targets) > 1:
        metrics.setdefault("mean", {})["test"] = mean_metrics([metrics[t]["test"] for t in targets])


def summary_lines(metrics: dict[str, Any], targets: tuple[str, ...]) -> list[str]:
    """Markdown lines of the held-out result per target (none when there is no test cohort)."""
    lines: list[str] = []
    for t in targets:
        rec = metrics.get(t, {}).get("test")
        if not rec or rec.get("auroc") is None:
            continue
        ceiling = ("" if rec.get("ceiling_auroc") is None else
                   f", ceiling {rec['ceiling_auroc']:.3f} ({rec['ceiling_fraction']:.1%} of it)")
        optimism = "" if rec.get("optimism") is None else f"; selection optimism {rec['optimism']:+.3f}"
        lines.append(f"- {t}: AUROC {rec['auroc']:.3f} (95 % CI {rec['auroc_lo']:.3f}-"
                     f"{rec['auroc_hi']:.3f}) on {rec['n']} images, {rec['n_pos']} positive"
                     f"{ceiling}{optimism}")
    return lines
