"""The evaluate stage's statistics, as one call: per target, CIs
(bootstrap + DeLong), the operating point at the target sensitivity, calibration, subgroups,
and optionally per-study metrics; plus the tables and figures of the HTML report.

Pure: arrays and frames in, dicts/frames/figures out; stages/evaluate.py writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from chexops.evaluation import stats


@dataclass
class Analysis:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)   # target -> JSON-able
    subgroups: dict[str, pd.DataFrame] = field(default_factory=dict)
    reliability: dict[str, pd.DataFrame] = field(default_factory=dict)


def _labels(valid: pd.DataFrame, target: str) -> tuple[np.ndarray, np.ndarray]:
    labels = pd.to_numeric(valid[target], errors="coerce").to_numpy()
    mask = np.isin(labels, (0, 1))
    return mask, labels[mask].astype(int)


def target_analysis(y: np.ndarray, p: np.ndarray, cfg: Any, seed: int) -> dict[str, Any]:
    """CIs, operating point and calibration of one target on one split."""
    ci = stats.bootstrap_ci(y, p, cfg.threshold, cfg.bootstrap, seed)
    record: dict[str, Any] = {
        "auroc_lo": ci["auroc"]["lo"], "auroc_hi": ci["auroc"]["hi"],   # the headline interval
        "ci": ci,
        "auroc_delong": stats.delong_auroc(y, p),
        "operating_point": stats.operating_point(y, p, cfg.target_sensitivity),
        "ece": stats.expected_calibration_error(y, p) if len(y) else None,
        "brier": stats.brier_score(y, p),
    }
    return record


def analyse(valid: pd.DataFrame, probs: np.ndarray, targets: tuple[str, ...], cfg: Any,
            seed: int) -> Analysis:
    """CIs, operating point, calibration, subgroups (and per-study metrics) for every target."""
    probs = np.asarray(probs, dtype=float).reshape(len(valid), len(targets))
    out = Analysis()
    for j, target in enumerate(targets):
        mask, y = _labels(valid, target)
        p = probs[mask, j]
        record = target_analysis(y, p, cfg, seed) if len(y) else {}
        if cfg.per_study and len(y):
            studies = stats.aggregate_studies(valid["Path"].to_numpy()[mask], y, p)
            record["per_study"] = {"n": int(len(studies)), "n_pos": int(studies.label.sum()),
                                   **stats.delong_auroc(studies.label, studies.prob)}
        out.metrics[target] = record
        out.subgroups[target] = stats.subgroup_auroc(valid.loc[mask], y, p)
        out.reliability[target] = stats.reliability_curve(y, p)
    return out


def summary_table(metrics: dict[str, Any], analysis: Analysis,
                  targets: tuple[str, ...]) -> pd.DataFrame:
    """One row per target and metric: value and 95 % CI; per-study AUROC and the TTA result
    when the evaluate params asked for them; the synthetic ceiling when there is one."""
    rows = []
    for t in targets:
        for name, ci in analysis.metrics.get(t, {}).get("ci", {}).items():
            rows.append({"target": t, "metric": name, "value": ci["value"], "lo": ci["lo"],
                         "hi": ci["hi"]})
        extra = analysis.metrics.get(t, {})
        for name in ("ece", "brier"):
            rows.append({"target": t, "metric": name, "value": extra.get(name), "lo": None,
                         "hi": None})
        study = extra.get("per_study")
        if study:  # evaluate.per_study: max over a study's views, DeLong's interval
            rows.append({"target": t, "metric": f"auroc_per_study ({study['n']} studies)",
                         "value": study["auroc"], "lo": study["lo"], "hi": study["hi"]})
        tta = dict(metrics.get(t, {}).get("tta", {}))
        views = tta.pop("views", None)
        for name, value in tta.items():  # evaluate.tta: the mean over augmented views
            rows.append({"target": t, "metric": f"{name}_tta ({views} views)", "value": value,
                         "lo": None, "hi": None})
        if metrics.get(t, {}).get("ceiling_auroc") is not None:
            rows.append({"target": t, "metric": "ceiling_auroc",
                         "value": metrics[t]["ceiling_auroc"], "lo": None, "hi": None})
        rows += heldout_rows(t, metrics.get(t, {}).get("test"))
    return pd.DataFrame(rows, columns=["target", "metric", "value", "lo", "hi"])


def heldout_rows(target: str, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The held-out test cohort's rows of the summary table (none without one)."""
    if not record or record.get("auroc") is None:
        return []
    rows = [{"target": target, "metric": f"auroc (held-out test, {record['n']} images)",
             "value": record["auroc"], "lo": record["auroc_lo"], "hi": record["auroc_hi"]}]
    for key, name in (("ceiling_auroc", "ceiling_auroc (test)"),
                      ("optimism", "selection optimism (valid - test AUROC)")):
        if record.get(key) is not None:
            rows.append({"target": target, "metric": name, "value": record[key], "lo": None,
                         "hi": None})
    return rows


def operating_table(analysis: Analysis, targets: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for t in targets:
        op = analysis.metrics.get(t, {}).get("operating_point", {})
        if op.get("threshold") is None:
            continue
        (tn, fp), (fn, tp) = op["confusion"]
        rows.append({"target": t, "target_sensitivity": op["target_sensitivity"],
                     "threshold": op["threshold"], "sensitivity": op["sensitivity"],
                     "specificity": op["specificity"], "precision": op["precision"],
                     "tp": tp, "fn": fn, "fp": fp, "tn": tn})
    return pd.DataFrame(rows)
