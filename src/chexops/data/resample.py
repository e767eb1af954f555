"""The `resample` stage: the seed study's oversample_and_prep and undersampling.

`resample_frame` is pure and seeded, so a training round can draw its own fresh sample.
Rows whose target is -1 (a policy that keeps uncertainty: ignore / multiclass / selftrained)
count as neither class: they are kept once each, not resampled, and share in `fraction`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from chexops.errors import ChexopsError

STAGE = "resample"
STRATEGIES = ("none", "oversample", "undersample")


def balance(pos: pd.DataFrame, neg: pd.DataFrame, strategy: str,
            rng: np.random.Generator) -> list[pd.DataFrame]:
    """Both classes at the majority count (oversample) or the minority count (undersample)."""
    small, big = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    if strategy == "oversample":
        extra = rng.integers(0, len(small), len(big) - len(small))
        return [big, small, small.iloc[extra]]            # every original row kept once
    keep = rng.choice(len(big), len(small), replace=False)
    return [small, big.iloc[np.sort(keep)]]


def resample_frame(df: pd.DataFrame, target: str, strategy: str, fraction: float,
                   seed: int) -> pd.DataFrame:
    """Balance `target` by `strategy`, then keep round(fraction * rows), shuffled; seeded.

    On CheXpert's 223,414 training rows under U-Zeros (27,000 positive, 196,414 negative):
    oversample + fraction 0.3 -> 117,848 rows; undersample -> 54,000."""
    if strategy not in STRATEGIES:
        raise ChexopsError(f"resample.strategy {strategy!r} is unknown; use none, oversample or undersample")
    if not 0 < fraction <= 1:
        raise ChexopsError(f"resample fraction {fraction} must be within (0, 1]")
    if target not in df.columns:
        raise ChexopsError(f"target {target!r} is not a column of the label table; re-run `dvc repro clean`")
    rng = np.random.default_rng(seed)
    y = df[target].to_numpy()
    pos, neg, other = df[y == 1], df[y == 0], df[(y != 1) & (y != 0)]
    parts = [df]
    if strategy != "none":
        if len(pos) == 0 or len(neg) == 0:
            raise ChexopsError(f"cannot {strategy} {target}: the training split has "
                               f"{len(pos)} positive and {len(neg)} negative rows; "
                               f"check the clean filters or use resample.strategy: none")
        parts = [*balance(pos, neg, strategy, rng), other]
    out = pd.concat(parts)
    n = int(round(fraction * len(out)))
    order = rng.permutation(len(out))[:n]
    return out.iloc[order].reset_index(drop=True)


def split_frames(labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid); raises when a patient appears in both (leakage)."""
    is_valid = labels["valid"].astype(bool)
    train, valid = labels[~is_valid], labels[is_valid]
    shared = sorted(set(train["patient"]) & set(valid["patient"]))
    if shared:
        raise ChexopsError(f"{len(shared)} patients are in both train and valid (e.g. {shared[0]}); "
                           f"fix the CSVs so each patient belongs to one split")
    return train.reset_index(drop=True), valid.reset_index(drop=True)


def class_counts(df: pd.DataFrame, target: str) -> dict[str, int]:
    y = df[target]
    return {"rows": len(df), "positive": int((y == 1).sum()), "negative": int((y == 0).sum()),
            "uncertain": int((y == -1).sum())}
