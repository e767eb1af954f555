"""`chexops evaluate`: the final weights on the validation split and the held-out test cohort ->
metrics, DVC plots, a report, the evaluate MLflow run, and then the trial run that ties the
whole `dvc repro` together."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chexops import atomic, paths
from chexops.commands.compare import predictions_frame
from chexops.config import N_ROUNDS, Params
from chexops.evaluation import confusion, figures, heldout, rounds
from chexops.evaluation import targets as evaluate
from chexops.model.recipe import SCORED_FIX, SCORED_KEYS, Recipe, check_recipe
from chexops.model.weights import read_recipe
from chexops.stages import evaluate_report
from chexops.tracking import runs as tracking
from chexops.tracking import store, trial

STAGE = "evaluate"
FINAL_ROUND = N_ROUNDS   # evaluate scores the last round's weights
METRICS_FILE = paths.METRICS_DIR / "evaluate.json"
PLOTS = paths.EVALUATE_PLOTS
REPORT_DIR = paths.EVALUATE_REPORT


def predict(params: Params, root: Path, weights: Path, valid: pd.DataFrame) -> np.ndarray:
    """Probabilities (N x targets); an empty split needs no model."""
    if len(valid) == 0:
        return np.zeros((0, len(params.targets)))
    from chexops.inference.frames import predict_frame

    return np.asarray(predict_frame(params, weights, valid, root / paths.RAW_ZIP, root))


# ---------------------------------------------------------------- TTA beside the plain result

TTA_KEYS = ("auroc", "precision", "recall", "specificity", "error_rate")


def add_tta(params: Params, root: Path, weights: Path, valid: pd.DataFrame,
            metrics: dict[str, Any]) -> None:
    """evaluate.tta = N > 0: metrics[<target>]['tta'] (and ['mean']['tta']) from the mean over
    N augmented views, next to the plain values (so metrics/evaluate.json and MLflow get
    `<target>.tta.auroc`)."""
    n = params.evaluate.tta
    if n <= 0 or len(valid) == 0:
        return
    from chexops.inference.frames import predict_frame

    probs = np.asarray(predict_frame(params, weights, valid, root / paths.RAW_ZIP, root, tta=n))
    tta, _ = evaluate.evaluate_targets(valid, probs, params.targets, params.evaluate.threshold)
    for name, m in tta.items():
        metrics.setdefault(name, {})["tta"] = {**{k: m[k] for k in TTA_KEYS if k in m}, "views": n}


# ---------------------------------------------------------------- the held-out test cohort

TEST_PREDICTIONS = REPORT_DIR / "test_predictions.parquet"   # `chexops compare --split test`


def score_heldout(params: Params, root: Path, weights: Path, metrics: dict[str, Any],
                  truth: pd.DataFrame | None) -> pd.DataFrame | None:
    """metrics[<target>]['test'] from data/clean/test.parquet (None when the data has no test
    cohort); returns its per-image predictions (compare.predictions_frame's layout)."""
    test = pd.read_parquet(paths.require(root, paths.CLEAN_TEST, "run `dvc repro clean` first"))
    if len(test) == 0:
        print("evaluate: no held-out test cohort (the data has no test.csv, or clean's filters "
              "left none of it)")
        return None
    probs = predict(params, root, weights, test)
    heldout.add_heldout(metrics, test, probs, params.targets, params.evaluate.threshold,
                        params.evaluate.bootstrap, params.seed, truth)
    return predictions_frame(test, probs, params.targets)


# ---------------------------------------------------------------- outputs

def write_metrics(root: Path, metrics: dict[str, Any]) -> None:
    """metrics/evaluate.json with each record's AUROC and 95 % CI first (DVC shows keys in file
    order, so `dvc exp show` opens with them)."""
    text = json.dumps(evaluate.headline_first(metrics), indent=2, default=str) + "\n"
    atomic.write_text(root / METRICS_FILE, text)


def write_plots(root: Path, curves: dict) -> None:
    for name, kind in (("roc.csv", "roc"), ("precision_recall.csv", "pr"),
                       ("confusion.csv", "confusion")):
        with atomic.atomic_path(root / PLOTS / name, ".csv") as tmp:
            evaluate.stack_curves(curves, kind).to_csv(tmp, index=False)


def rounds_history(root: Path) -> pd.DataFrame:
    """Every round's epochs in one table (chexops.evaluation.rounds), written to
    plots/evaluate/rounds.csv for `dvc plots` (dvc.yaml: the rounds-loss and rounds-auroc plots)."""
    histories = {k: pd.read_csv(root / paths.round_history(k)) for k in range(1, N_ROUNDS + 1)
                 if (root / paths.round_history(k)).is_file()}
    table = rounds.rounds_table(histories)
    with atomic.atomic_path(root / PLOTS / "rounds.csv", ".csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def write_report(root: Path, metrics: dict, curves: dict, targets: tuple[str, ...],
                 history: pd.DataFrame) -> dict:
    """reports/evaluate/{report.md, roc.png, precision_recall.png, confusion*.png, rounds.png},
    swapped in whole; returns figures."""
    drawn = {"roc.png": figures.roc_figure(curves, metrics),
             "precision_recall.png": figures.pr_figure(curves, metrics),
             "rounds.png": rounds.rounds_figure(history)}
    for t in targets:
        name = "confusion.png" if len(targets) == 1 else f"confusion-{evaluate.slug(t)}.png"
        drawn[name] = confusion.confusion_figure(metrics[t].get("confusion"), t)
    weights = paths.round_weights(FINAL_ROUND).as_posix()
    with atomic.atomic_dir(root / REPORT_DIR) as tmp:
        (tmp / "report.md").write_text(figures.markdown_report(metrics, targets, weights))
        for name, fig in drawn.items():
            fig.savefig(tmp / name)
    return drawn


def log_to_run(run: store.StageRun, root: Path, params: Params, metrics: dict,
               figures: dict, n_valid: int, recipe: Recipe) -> None:
    """Params, metrics, figures and outputs; image size and arch are the weights' (recipe)."""
    run.log_params({"threshold": params.evaluate.threshold, "targets": list(params.targets),
                    "weights": paths.round_weights(FINAL_ROUND).as_posix(), "n_valid": n_valid,
                    "image_size": recipe.image_size, "arch": recipe.arch})
    run.log_metrics(store.numeric_metrics(metrics))
    run.log_dict({t: m.get("confusion") for t, m in metrics.items() if "confusion" in m},
                 "confusion.json")
    for name, fig in figures.items():
        run.log_figure(fig, f"figures/{name}")
    run.log_artifact(root / METRICS_FILE, "metrics")
    run.log_artifact(root / PLOTS, "plots")
    run.log_artifact(root / REPORT_DIR, "report")


def main(params: Params, root: Path) -> None:
    root = Path(root)
    weights = paths.require(root, paths.round_weights(FINAL_ROUND),
                            f"run `dvc repro train-round-{FINAL_ROUND}` first")
    valid = pd.read_parquet(paths.require(root, paths.RESAMPLED_VALID, "run `dvc repro resample` first"))
    truth = pd.read_parquet(root / paths.TRUTH) if (root / paths.TRUTH).is_file() else None
    recipe = check_recipe(read_recipe(weights, params), params, f"chexops {STAGE}",
                          SCORED_KEYS, SCORED_FIX)  # the weights win: one line per difference
    with tracking.stage_run(params, root, STAGE) as run:
        probs = predict(params, root, weights, valid)
        metrics, curves = evaluate.evaluate_targets(valid, probs, params.targets,
                                                    params.evaluate.threshold, truth)
        extra = evaluate_report.extend_metrics(params, valid, probs, metrics)
        add_tta(params, root, weights, valid, metrics)  # TTA beside the plain result
        held = score_heldout(params, root, weights, metrics, truth)
        write_metrics(root, metrics)
        write_plots(root, curves)
        figures = write_report(root, metrics, curves, params.targets, rounds_history(root))
        figures.update(evaluate_report.write_outputs(  # predictions, report.html, Grad-CAM
            params, root, valid, probs, metrics, extra, weights, dict(figures)))
        if held is not None:
            atomic.write_parquet(root / TEST_PREDICTIONS, held)
        log_to_run(run, root, params, metrics, figures, len(valid), recipe)
        evaluate_report.register_model(params, run, root, weights)  # MLflow registry
        _print_summary(metrics, params.targets)
    trial.close_trial(params, root, run, {STAGE: metrics},
                      {"rounds.png": figures["rounds.png"]})  # the trial's learning curves


def _print_summary(metrics: dict[str, Any], targets: tuple[str, ...]) -> None:
    for t in targets:
        m = metrics[t]
        auroc = "n/a" if m.get("auroc") is None else f"{m['auroc']:.3f}"
        print(f"evaluate {t}: AUROC {auroc} on {m.get('n', 0)} images"
              + (f" ({m['note']})" if m.get("note") else ""))
    for line in heldout.summary_lines(metrics, targets):
        print(f"evaluate held-out test cohort {line[2:]}")
