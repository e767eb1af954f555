"""The evaluate stage's curves as figures (ROC, precision-recall) and its markdown summary.
matplotlib's object API only (no pyplot state), so figures are safe in any process."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from chexops.evaluation import heldout

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_report(metrics: dict[str, Any], targets: tuple[str, ...], weights: str) -> str:
    """A one-page markdown summary: the seed study's table, confusion matrices and notes."""
    columns = ["n", "n_pos", "auroc", "ceiling_auroc", "precision", "recall", "specificity",
               "error_rate"]
    lines = ["# Evaluation on the validation split", "", f"Weights: `{weights}`", "",
             "| target | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for t in targets:
        lines.append(f"| {t} | " + " | ".join(_fmt(metrics[t].get(c)) for c in columns) + " |")
    for t in targets:
        m = metrics[t]
        lines += ["", f"## {t}", "", f"Threshold {m.get('threshold')}."]
        if m.get("confusion"):
            (tn, fp), (fn, tp) = m["confusion"]
            lines += ["", "| actual \\ predicted | 0 | 1 |", "|---|---|---|",
                      f"| 0 | {tn} | {fp} |", f"| 1 | {fn} | {tp} |"]
        if m.get("note"):
            lines += ["", f"Note: {m['note']}."]
    held = heldout.summary_lines(metrics, targets)
    if held:
        lines += ["", "## Held-out test cohort", "",
                  "Scored once, by evaluate; no epoch, round or trial was chosen on it. Selection "
                  "optimism = validation AUROC - test AUROC.", "", *held]
    return "\n".join(lines) + "\n"


def pr_figure(curves: dict[str, dict[str, pd.DataFrame]], metrics: dict[str, Any]) -> "Figure":
    """Precision-recall curves of every target, with each target's prevalence (the curve of a
    model that guesses) dashed and its precision/recall at the threshold in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    for target, c in curves.items():
        m = metrics[target]
        line, = ax.plot(c["pr"]["recall"], c["pr"]["precision"],
                        label=f"{target} (P {_fmt(m.get('precision'))}, R {_fmt(m.get('recall'))})")
        if m.get("n"):
            ax.axhline(m.get("n_pos", 0) / m["n"], linestyle="--", linewidth=1,
                       color=line.get_color())
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def roc_figure(curves: dict[str, dict[str, pd.DataFrame]], metrics: dict[str, Any]) -> "Figure":
    """ROC curves of every target with their AUROC in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for target, c in curves.items():
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"],
                label=f"{target} (AUROC {_fmt(metrics[target].get('auroc'))})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig

