"""The confusion matrix as a figure: the one figure every training round logs, kept apart from
the evaluate stage's figures so that editing those never retrains a round."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def confusion_figure(confusion: list[list[int]] | None, target: str) -> "Figure":
    """Confusion matrix heat map (rows actual, columns predicted)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.2), dpi=100)
    ax = fig.subplots()
    matrix = np.asarray(confusion if confusion else [[0, 0], [0, 0]])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="actual", title=target)
    fig.tight_layout()
    return fig
