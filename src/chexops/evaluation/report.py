"""The one-page evaluation report: self-contained HTML (every plot inlined as a base64 PNG, no
scripts, no external links), readable offline and loggable to MLflow as one file. Also the
figures only this report draws: reliability curves and subgroup AUROCs with intervals."""
from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f2f2f2}img{max-width:100%;margin:.4em 0}
.note{color:#a40}"""


def figure_png(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table_html(frame: "pd.DataFrame") -> str:
    """An escaped HTML table; floats to 3 decimals, missing values as n/a."""
    return frame.astype(object).map(_cell).to_html(index=False, escape=True, border=0)


def page(title: str, sections: list[tuple[str, list[Any]]]) -> str:
    """sections: (heading, parts); a part is a DataFrame (table), bytes (PNG), a Figure, or text."""
    import pandas as pd

    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, parts in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for part in parts:
            if isinstance(part, pd.DataFrame):
                body.append(table_html(part))
            elif isinstance(part, (bytes, bytearray)):
                body.append(img_tag(bytes(part), heading))
            elif hasattr(part, "savefig"):
                body.append(img_tag(figure_png(part), heading))
            else:
                body.append(f"<p>{html.escape(str(part))}</p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def reliability_figure(curves: dict[str, "pd.DataFrame"], ece: dict[str, float | None]) -> "Figure":
    """Observed positive rate against mean predicted probability per bin; diagonal = calibrated."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for target, curve in curves.items():
        e = ece.get(target)
        ax.plot(curve["mean_prob"], curve["frac_pos"], marker="o",
                label=f"{target} (ECE {e:.3f})" if e is not None else target)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate",
           xlim=(0, 1), ylim=(0, 1), title="reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def subgroup_figure(table: "pd.DataFrame", target: str) -> "Figure":
    """AUROC per subgroup with its DeLong interval (a forest plot); undefined groups left out."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = table.dropna(subset=["auroc"]).reset_index(drop=True)
    fig = Figure(figsize=(5, 0.35 * max(len(rows), 1) + 1.2), dpi=100)
    ax = fig.subplots()
    if len(rows):
        y = np.arange(len(rows))[::-1]
        lo = (rows["auroc"] - rows["lo"].fillna(rows["auroc"])).to_numpy(dtype=float)
        hi = (rows["hi"].fillna(rows["auroc"]) - rows["auroc"]).to_numpy(dtype=float)
        ax.errorbar(rows["auroc"], y, xerr=[lo, hi], fmt="o", capsize=3)
        ax.set_yticks(y, [f"{k}: {g} (n={n})" for k, g, n in zip(rows.kind, rows.group, rows.n)],
                      fontsize=8)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xlim=(0, 1), xlabel="AUROC (95 % CI)", title=f"{target}: subgroups")
    fig.tight_layout()
    return fig
