"""The five rounds' learning curves as one table and one figure: training and validation loss
and validation AUROC per epoch, on one axis of epochs counted across rounds, with each round's
best marked. It shows what each round added (or lost), the question the seed study answered by
eye from fastai's per-round plots.

Pure: the rounds' history tables in, a frame and a matplotlib Figure out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

COLUMNS = ("round", "epoch", "step", "train_loss", "valid_loss", "auroc", "best")


def rounds_table(histories: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """One row per (round, epoch) over all rounds: `step` counts training epochs across rounds
    (a round's epoch 0, the score of the weights it starts from, shares the previous round's
    last step: the same weights), and `best` marks each round's best epoch by validation AUROC
    (the first of equal ones, as the rounds select).

    histories: {round k: its history.csv frame (epoch, train_loss, valid_loss, auroc, ...)}."""
    frames, offset = [], 0
    for k in sorted(histories):
        h = histories[k].reset_index(drop=True)
        epochs = h["epoch"].to_numpy(dtype=int)
        auroc = pd.to_numeric(h["auroc"], errors="coerce").to_numpy(dtype=float)
        best = np.zeros(len(h), dtype=bool)
        if np.isfinite(auroc).any():
            best[int(np.nanargmax(auroc))] = True
        frames.append(pd.DataFrame({
            "round": k, "epoch": epochs, "step": offset + epochs,
            "train_loss": pd.to_numeric(h.get("train_loss"), errors="coerce"),
            "valid_loss": pd.to_numeric(h["valid_loss"], errors="coerce"),
            "auroc": auroc, "best": best}))
        offset += int(epochs.max(initial=0))
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)]


def rounds_figure(table: pd.DataFrame) -> "Figure":
    """Two panels over the epochs of all rounds: loss (training solid, validation dashed) and
    validation AUROC, each round in its own colour, its best epoch ringed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=100)
    loss_ax, auroc_ax = fig.subplots(1, 2)
    for k, part in table.groupby("round", sort=True):
        colour = f"C{(int(k) - 1) % 10}"
        loss_ax.plot(part["step"], part["train_loss"], "-o", ms=3, color=colour, label=f"round {k}")
        loss_ax.plot(part["step"], part["valid_loss"], "--", color=colour)
        auroc_ax.plot(part["step"], part["auroc"], "-o", ms=3, color=colour, label=f"round {k}")
        best = part[part["best"]]
        auroc_ax.scatter(best["step"], best["auroc"], s=70, facecolors="none", edgecolors=colour)
    loss_ax.set(title="loss (training solid, validation dashed)", xlabel="epoch (all rounds)",
                ylabel="loss")
    auroc_ax.set(title="validation AUROC (best epoch ringed)", xlabel="epoch (all rounds)",
                 ylabel="AUROC")
    if len(table):   # no rounds' histories (evaluate run by hand): nothing to label
        auroc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
