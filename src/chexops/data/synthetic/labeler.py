"""The synthetic cohort's truth and its noisy "report labeler" (CheXpert-style labels).

Truth is per study. Training labels come from a simulated report: cases near the
cardiomegaly threshold are often called uncertain, and most negatives are never mentioned
(blank), as in CheXpert's automatic labeler. Validation labels are expert reads (0/1 only).
Blank is NaN; labels are 1.0 / 0.0 / -1.0.
"""
from __future__ import annotations

import numpy as np

CTR_THRESHOLD = 0.50
BLANK = np.nan

# Observations drawn label-only: CheXpert-small train fractions (positive, uncertain, negative).
LABEL_ONLY = {
    "Enlarged Cardiomediastinum": (0.048, 0.056, 0.097),
    "Lung Opacity": (0.47, 0.025, 0.030),
    "Lung Lesion": (0.041, 0.007, 0.006),
    "Consolidation": (0.066, 0.124, 0.126),
    "Pneumonia": (0.027, 0.084, 0.013),
    "Atelectasis": (0.149, 0.151, 0.006),
    "Pneumothorax": (0.087, 0.014, 0.252),
    "Pleural Other": (0.016, 0.012, 0.0014),
    "Fracture": (0.040, 0.003, 0.011),
}
# Visible observations: (mention rate of true negatives as 0, as -1) of the report labeler.
VISIBLE_NEGATIVE_MENTION = {"Edema": (0.12, 0.05), "Pleural Effusion": (0.22, 0.05),
                            "Support Devices": (0.05, 0.005)}


def _pick(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One category per row from rows of probabilities [p(1), p(-1), p(0)]; rest is blank."""
    r = rng.random(len(probs))
    cum = np.cumsum(probs, axis=1)
    out = np.full(len(probs), BLANK)
    for value, col in ((0.0, 2), (-1.0, 1), (1.0, 0)):   # later assignments win (lower cum)
        out[r < cum[:, col]] = value
    return out


def cardiomegaly_report(rng: np.random.Generator, ctr: np.ndarray) -> np.ndarray:
    """Train-split Cardiomegaly labels from the true CTR; near the threshold -> often -1.

    Tuned so that the default cohort gives about 12 % positive, 5 % negative, 3.6 % uncertain
    and 79 % blank rows (CheXpert's train mix)."""
    d = ctr - CTR_THRESHOLD
    near = np.exp(-(d / 0.03) ** 2)
    pos = d > 0
    unc = np.where(pos, 0.20 * near + 0.02, 0.09 * near + 0.004)
    p1 = np.where(pos, (1 - unc) * 0.88, 0.012)
    p0 = np.where(pos, 0.01, 0.05 + 0.05 * near)
    return _pick(rng, np.stack([p1, unc, p0], axis=1))


def visible_report(rng: np.random.Generator, truth: np.ndarray, name: str) -> np.ndarray:
    """Labels of a visible finding: positives mostly reported, negatives mostly blank."""
    neg0, neg_unc = VISIBLE_NEGATIVE_MENTION[name]
    p1 = np.where(truth, 0.88, 0.01)
    unc = np.where(truth, 0.08, neg_unc)
    p0 = np.where(truth, 0.0, neg0)
    return _pick(rng, np.stack([p1, unc, p0], axis=1))


def label_only(rng: np.random.Generator, n: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(report labels, truth) of an observation the images do not show."""
    pos, unc, neg = LABEL_ONLY[name]
    labels = _pick(rng, np.tile([pos, unc, neg], (n, 1)))
    truth = (labels == 1) | ((labels == -1) & (rng.random(n) < 0.5))
    return labels, truth


def no_finding(labels: dict[str, np.ndarray]) -> np.ndarray:
    """CheXpert's rule: 1 when no pathology is positive or uncertain (devices aside), else blank."""
    any_finding = np.zeros(len(next(iter(labels.values()))), dtype=bool)
    for name, values in labels.items():
        if name not in ("No Finding", "Support Devices"):
            any_finding |= np.isin(values, (1.0, -1.0))
    return np.where(any_finding, BLANK, 1.0)
