"""Statistics that tell a real difference from noise: bootstrap and DeLong confidence intervals,
the paired DeLong test, an operating point at a target sensitivity, calibration, subgroups and
per-study aggregation.

Pure NumPy, vectorised; inputs are 1-D arrays of 0/1 labels and probabilities. A 234-image
validation split gives an AUROC interval of about +-0.06, so a single AUROC never decides
between two trials: these functions do.

DeLong: the fast midrank algorithm of Sun & Xu (2014), "Fast implementation of DeLong's
algorithm for comparing the areas under correlated ROC curves", IEEE SPL 21(11).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

Z95 = 1.959963984540054
BOOT_CHUNK = 250  # bootstrap resamples per vectorised block: bounds memory at large N


def _as_arrays(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(y_prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, y_prob {p.size}")
    return y, p


def _z(alpha: float) -> float:
    from statistics import NormalDist

    return Z95 if alpha == 0.05 else NormalDist().inv_cdf(1 - alpha / 2)


def two_sided_p(z: float) -> float:
    """Two-sided normal p-value of a z statistic."""
    return float(math.erfc(abs(z) / math.sqrt(2.0)))


# ---------------------------------------------------------------- DeLong

def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank (Sun & Xu's midranks)."""
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=-1)


def fast_delong(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs (k,), covariance (k, k)) of k classifiers' scores on the same m positives
    (pos: k x m) and n negatives (neg: k x n). Covariance is NaN with fewer than 2 of a class."""
    pos, neg = np.atleast_2d(pos).astype(float), np.atleast_2d(neg).astype(float)
    m, n = pos.shape[1], neg.shape[1]
    tx, ty = midranks(pos), midranks(neg)
    tz = midranks(np.concatenate([pos, neg], axis=1))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    if m < 2 or n < 2:
        return aucs, np.full((len(aucs), len(aucs)), np.nan)
    v01 = (tz[:, :m] - tx) / n          # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m    # ... and of the negatives
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def _split(y: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.vstack(scores)
    return stacked[:, y == 1], stacked[:, y == 0]


def delong_auroc(y_true: Any, y_prob: Any, alpha: float = 0.05) -> dict[str, Any]:
    """AUROC with DeLong's variance and a normal (1 - alpha) interval clipped to [0, 1];
    every value None when one class is missing."""
    y, p = _as_arrays(y_true, y_prob)
    if len(np.unique(y)) < 2:
        return {"auroc": None, "var": None, "lo": None, "hi": None}
    aucs, cov = fast_delong(*_split(y, p))
    auc, var = float(aucs[0]), float(cov[0, 0])
    if not math.isfinite(var):
        return {"auroc": auc, "var": None, "lo": None, "hi": None}
    half = _z(alpha) * math.sqrt(var)
    return {"auroc": auc, "var": var, "lo": max(0.0, auc - half), "hi": min(1.0, auc + half)}


def paired_delong(y_true: Any, prob_a: Any, prob_b: Any, alpha: float = 0.05) -> dict[str, Any]:
    """DeLong's test of AUROC(B) - AUROC(A) on the same images: difference, its (1 - alpha)
    interval, z and the two-sided p-value (p = 1 when the two predictions are identical)."""
    y, a = _as_arrays(y_true, prob_a)
    _, b = _as_arrays(y_true, prob_b)
    if len(np.unique(y)) < 2:
        raise ValueError("the labels hold one class only: AUROC and the DeLong test are undefined")
    aucs, cov = fast_delong(*_split(y, a, b))
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if not math.isfinite(var):
        raise ValueError("the DeLong test needs at least 2 positives and 2 negatives")
    se = math.sqrt(max(var, 0.0))
    z = diff / se if se > 0 else 0.0
    p = two_sided_p(z) if se > 0 else (1.0 if diff == 0 else 0.0)
    half = _z(alpha) * se
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "diff": diff, "se": se,
            "lo": diff - half, "hi": diff + half, "z": z, "p_value": p, "alpha": alpha,
            "n": int(len(y)), "n_pos": int(y.sum())}


def verdict(test: dict[str, Any]) -> str:
    """The plain sentence a clinician reads."""
    level = f"{test['alpha'] * 100:g} %"
    if test["p_value"] < test["alpha"]:
        better, worse = ("B", "A") if test["diff"] > 0 else ("A", "B")
        return f"{better} is better than {worse} at the {level} level"
    return f"no detectable difference at the {level} level"


# ---------------------------------------------------------------- bootstrap

def _auroc_weighted(pos: np.ndarray, neg: np.ndarray, c_pos: np.ndarray,
                    c_neg: np.ndarray) -> np.ndarray:
    """AUROC of each resample, given as counts (B x m, B x n) of each original positive and
    negative: sum_i c_i * (# weighted negatives below pos_i + half the ties) / (m * n)."""
    order = np.argsort(neg, kind="stable")
    sorted_neg = neg[order]
    cum = np.concatenate([np.zeros((len(c_neg), 1)), np.cumsum(c_neg[:, order], axis=1)], axis=1)
    left = np.searchsorted(sorted_neg, pos, side="left")
    right = np.searchsorted(sorted_neg, pos, side="right")
    below = cum[:, left] + 0.5 * (cum[:, right] - cum[:, left])
    return (c_pos * below).sum(axis=1) / (c_pos.sum(axis=1) * c_neg.sum(axis=1))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _boot_block(pos: np.ndarray, neg: np.ndarray, threshold: float, b: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One block of b stratified resamples: positives and negatives resampled separately."""
    m, n = len(pos), len(neg)
    c_pos = rng.multinomial(m, np.full(m, 1.0 / m), size=b).astype(float)
    c_neg = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)
    tp = c_pos @ (pos >= threshold)
    fp = c_neg @ (neg >= threshold)
    return {"auroc": _auroc_weighted(pos, neg, c_pos, c_neg), "precision": _ratio(tp, tp + fp),
            "recall": tp / m, "specificity": 1.0 - fp / n}


def bootstrap_ci(y_true: Any, y_prob: Any, threshold: float = 0.5, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict[str, dict[str, float | None]]:
    """Percentile (1 - alpha) intervals of AUROC, precision, recall and specificity from a
    seeded stratified bootstrap (class sizes fixed, as in the validation split). Each metric:
    {value, lo, hi}; None everywhere when one class is missing."""
    from chexops.evaluation.metrics import binary_metrics

    y, p = _as_arrays(y_true, y_prob)
    names = ("auroc", "precision", "recall", "specificity")
    if len(np.unique(y)) < 2:
        return {k: {"value": None, "lo": None, "hi": None} for k in names}
    point = binary_metrics(y, p, threshold)
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(seed)
    blocks = [_boot_block(pos, neg, threshold, min(BOOT_CHUNK, n_boot - i), rng)
              for i in range(0, n_boot, BOOT_CHUNK)]
    out: dict[str, dict[str, float | None]] = {}
    for k in names:
        draws = np.concatenate([blk[k] for blk in blocks])
        lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
        out[k] = {"value": float(point[k]), "lo": float(lo), "hi": float(hi)}
    return out


# ---------------------------------------------------------------- operating point

def threshold_for_sensitivity(y_true: Any, y_prob: Any, target: float) -> float:
    """The highest threshold whose sensitivity (predicting p >= threshold) reaches `target`."""
    y, p = _as_arrays(y_true, y_prob)
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases: sensitivity is undefined")
    k = min(len(pos), max(1, math.ceil(target * len(pos) - 1e-9)))
    return float(pos[k - 1])


def operating_point(y_true: Any, y_prob: Any, target_sensitivity: float) -> dict[str, Any]:
    """Threshold reaching the target sensitivity on this split, with its confusion matrix,
    sensitivity, specificity and precision; None values when there are no positives."""
    from chexops.evaluation.metrics import binary_metrics

    y, p = _as_arrays(y_true, y_prob)
    if y.sum() == 0:
        return {"target_sensitivity": target_sensitivity, "threshold": None,
                "note": "no positive cases: sensitivity is undefined"}
    t = threshold_for_sensitivity(y, p, target_sensitivity)
    m = binary_metrics(y, p, t)
    return {"target_sensitivity": target_sensitivity, "threshold": t, "sensitivity": m["recall"],
            "specificity": m["specificity"], "precision": m["precision"],
            "confusion": m["confusion"]}


# ---------------------------------------------------------------- calibration

def reliability_curve(y_true: Any, y_prob: Any, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width probability bins: lower, upper, count, mean predicted, observed positive rate
    (empty bins are left out)."""
    y, p = _as_arrays(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    keep = count > 0
    return pd.DataFrame({"lower": edges[:-1][keep], "upper": edges[1:][keep],
                         "count": count[keep], "mean_prob": sum_p[keep] / count[keep],
                         "frac_pos": sum_y[keep] / count[keep]})


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 10) -> float | None:
    """Sum over bins of (bin share) * |observed rate - mean predicted probability|."""
    curve = reliability_curve(y_true, y_prob, n_bins)
    total = curve["count"].sum()
    if total == 0:
        return None
    gap = (curve["frac_pos"] - curve["mean_prob"]).abs()
    return float((curve["count"] * gap).sum() / total)


def brier_score(y_true: Any, y_prob: Any) -> float | None:
    y, p = _as_arrays(y_true, y_prob)
    return float(np.mean((p - y) ** 2)) if len(y) else None


# ---------------------------------------------------------------- subgroups and studies

AGE_BINS = (0, 40, 60, 80, 200)
UNKNOWN = "unknown"   # the group of rows whose Sex or Age is blank (or CheXpert's "Unknown")


def subgroup_labels(df: pd.DataFrame, age_bins: tuple[int, ...] = AGE_BINS) -> dict[str, pd.Series]:
    """{subgroup kind: label per row}; kinds whose column is missing are left out. A blank or
    "Unknown" Sex and a missing Age form the group `unknown`. AP/PA is defined on frontal views
    only (laterals get no label there)."""
    out: dict[str, pd.Series] = {}
    if "Sex" in df:
        sex = df["Sex"].astype("string").str.strip()
        out["sex"] = sex.mask(sex.isna() | sex.str.lower().isin(["", UNKNOWN]), UNKNOWN)
    if "Age" in df:
        age = pd.to_numeric(df["Age"], errors="coerce").astype(float)
        names = [f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+" for lo, hi in zip(age_bins, age_bins[1:])]
        binned = pd.cut(age, list(age_bins), right=False, labels=names).astype("string")
        out["age"] = binned.mask(age.isna(), UNKNOWN)
    if "Frontal/Lateral" in df:
        out["view"] = df["Frontal/Lateral"].astype("string")
    if "AP/PA" in df:
        appa = df["AP/PA"].astype("string").replace("", pd.NA)
        if "Frontal/Lateral" in df:
            appa = appa.where(df["Frontal/Lateral"].astype("string") == "Frontal")
        out["ap_pa"] = appa
    return out


def subgroup_auroc(df: pd.DataFrame, y_true: Any, y_prob: Any,
                   alpha: float = 0.05) -> pd.DataFrame:
    """One row per (kind, group): n, n_pos, AUROC with its DeLong interval (None when the
    group holds one class), so a user sees where the model is weak."""
    y, p = _as_arrays(y_true, y_prob)
    rows = []
    for kind, labels in subgroup_labels(df.reset_index(drop=True)).items():
        for group in sorted(labels.dropna().unique()):
            sel = (labels == group).fillna(False).to_numpy(dtype=bool)
            d = delong_auroc(y[sel], p[sel], alpha)
            rows.append({"kind": kind, "group": str(group), "n": int(sel.sum()),
                         "n_pos": int(y[sel].sum()), "auroc": d["auroc"], "lo": d["lo"],
                         "hi": d["hi"]})
    return pd.DataFrame(rows, columns=["kind", "group", "n", "n_pos", "auroc", "lo", "hi"])


def study_ids(paths: Any) -> np.ndarray:
    """'CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg' -> 'patient64541/study1'."""
    parts = pd.Series(paths, dtype="string").str.split("/")
    return (parts.str[-3] + "/" + parts.str[-2]).to_numpy(dtype=object)


def aggregate_studies(paths: Any, y_true: Any, y_prob: Any) -> pd.DataFrame:
    """One row per study (the CheXpert paper's rule): label and probability are the max over
    the study's views."""
    y, p = _as_arrays(y_true, y_prob)
    frame = pd.DataFrame({"study": study_ids(paths), "label": y, "prob": p})
    out = frame.groupby("study", sort=True).agg(label=("label", "max"), prob=("prob", "max"),
                                                 views=("prob", "size"))
    return out.reset_index()
