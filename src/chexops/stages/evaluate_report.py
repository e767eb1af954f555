"""The evaluate stage's statistics, report, Grad-CAM and registry, called from
stages/evaluate.py in three places:

1. `extend_metrics` adds CIs, the operating point, calibration, subgroups (and per-study
   metrics) to each target's record of metrics/evaluate.json;
2. `write_outputs` writes, into reports/evaluate/ (after the base report dir is in place, so it
   is logged with it as the run's `report/` artifact): predictions.parquet (per image: Path,
   label and probability per target, for `chexops compare`), Grad-CAM grids and report.html
   (self-contained); and plots/evaluate/{calibration,subgroups}.csv for `dvc plots`;
3. `register_model` logs the final weights as a pyfunc model and registers it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chexops import atomic, paths
from chexops.commands import compare
from chexops.config import Params
from chexops.evaluation import analysis, report
from chexops.evaluation.targets import slug

REPORT_DIR = paths.EVALUATE_REPORT
HTML = REPORT_DIR / "report.html"
PLOTS = paths.EVALUATE_PLOTS


def extend_metrics(params: Params, valid: pd.DataFrame, probs: np.ndarray,
                   metrics: dict[str, Any]) -> analysis.Analysis:
    """Merge the richer statistics into `metrics` (per target) and return them."""
    result = analysis.analyse(valid, probs, params.targets, params.evaluate, params.seed)
    for t in params.targets:
        metrics[t].update(result.metrics.get(t, {}))
        metrics[t]["subgroups"] = result.subgroups[t].replace({np.nan: None}).to_dict("records")
    return result


def _gradcam_figures(params: Params, root: Path, valid: pd.DataFrame, probs: np.ndarray,
                     weights: Path) -> dict[str, Any]:
    """{'gradcam-<target>-<kind>.png': Figure} for a seeded sample of TP/FN/FP cases."""
    per_kind = params.evaluate.gradcam_per_kind
    if per_kind <= 0 or len(valid) == 0:
        return {}
    from chexops.inference import gradcam
    from chexops.inference.frames import load_images
    from chexops.inference.predictor import predictor_from_weights

    predictor = predictor_from_weights(weights, params)   # the weights' network and size
    images = load_images(params, valid, root / paths.RAW_ZIP, root, predictor.image_size)
    figures = {}
    for j, t in enumerate(params.targets):
        labels = pd.to_numeric(valid[t], errors="coerce").to_numpy()
        mask = np.isin(labels, (0, 1))
        grids = gradcam.case_grids(predictor.model, np.asarray(images)[mask],
                                   valid["Path"].astype(str).to_numpy()[mask].tolist(),
                                   labels[mask].astype(int), probs[mask, j], j, t,
                                   params.evaluate.threshold, per_kind, params.seed,
                                   predictor.device, coding=predictor.coding)
        figures.update({f"gradcam-{slug(t)}-{k.lower()}.png": f for k, f in grids.items()})
    return figures


def _html(params: Params, metrics: dict[str, Any], result: analysis.Analysis,
          base_figures: dict[str, Any], extra: dict[str, Any]) -> str:
    sections: list[tuple[str, list[Any]]] = [
        ("Metrics with 95 % confidence intervals",
         [analysis.summary_table(metrics, result, params.targets),
          "Intervals: stratified bootstrap (percentile, seeded); AUROC also has DeLong's interval "
          "in metrics/evaluate.json."]),
        (f"Operating point at sensitivity {params.evaluate.target_sensitivity}",
         [analysis.operating_table(result, params.targets)]),
        ("ROC, precision-recall and confusion at threshold", list(base_figures.values())),
        ("Calibration", [extra["reliability.png"]]),
    ]
    for t in params.targets:
        sections.append((f"{t}: subgroups", [result.subgroups[t], extra[f"subgroups-{slug(t)}.png"]]))
    cams = [f for name, f in extra.items() if name.startswith("gradcam-")]
    if cams:
        sections.append(("Grad-CAM: true positives, false negatives, false positives", cams))
    return report.page("chexops evaluation", sections)


def write_outputs(params: Params, root: Path, valid: pd.DataFrame, probs: np.ndarray,
                  metrics: dict[str, Any], result: analysis.Analysis, weights: Path,
                  base_figures: dict[str, Any]) -> dict[str, Any]:
    """Write predictions, report.html and the Grad-CAM grids into reports/evaluate/; return the
    new figures (for MLflow)."""
    probs = np.asarray(probs, dtype=float).reshape(len(valid), len(params.targets))
    out = root / REPORT_DIR
    atomic.write_parquet(out / "predictions.parquet",
                         compare.predictions_frame(valid, probs, params.targets))
    figures: dict[str, Any] = {"reliability.png": report.reliability_figure(
        result.reliability, {t: metrics[t].get("ece") for t in params.targets})}
    for t in params.targets:
        figures[f"subgroups-{slug(t)}.png"] = report.subgroup_figure(result.subgroups[t], t)
    write_plot_tables(root, params.targets, result)
    figures.update(_gradcam_figures(params, root, valid, probs, weights))
    for name, fig in figures.items():
        if name.startswith("gradcam-"):
            with atomic.atomic_path(out / name, ".png") as tmp:
                fig.savefig(tmp, format="png")
    atomic.write_text(root / HTML, _html(params, metrics, result, base_figures, figures))
    return figures


def write_plot_tables(root: Path, targets: tuple[str, ...], result: analysis.Analysis) -> None:
    """plots/evaluate/{calibration,subgroups}.csv for `dvc plots` (a `target` column when
    there are several targets, as the base stage's plots do)."""
    for name, tables in (("calibration.csv", result.reliability), ("subgroups.csv", result.subgroups)):
        frames = [tables[t].assign(target=t) if len(targets) > 1 else tables[t] for t in targets]
        with atomic.atomic_path(root / PLOTS / name, ".csv") as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)


def register_model(params: Params, run: Any, root: Path, weights: Path) -> str | None:
    """Log the final model to the evaluate run and register it (evaluate.register, default on);
    returns the model URI, or None when registration is off."""
    if not params.evaluate.register:
        return None
    from chexops.tracking import registry

    info = registry.log_model(params, root, run.run_id, weights)
    version = registry.register(info.model_uri, registry.model_name(params),
                                champion=params.evaluate.champion)
    run.set_tags({"chexops.model_uri": info.model_uri,
                  "chexops.registered_model": f"{registry.model_name(params)}/{version.version}"})
    return info.model_uri
