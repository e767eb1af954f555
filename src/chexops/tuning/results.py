"""What a `chexops tune` study found: each trial's objective (read from its DVC experiment's
metrics/evaluate.json: evaluate's validation metrics, never a test cohort) and MLflow trial run,
the best trial, and Optuna's plots (optimisation history, parameter importances, parallel
coordinates; matplotlib backend) in reports/tune/<study>/ and on the study's MLflow summary run.

mlflow is imported inside functions.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from chexops import atomic
from chexops.config import Params
from chexops.paths import main_repo_root
from chexops.redact import redact_url
from chexops.tracking import git
from chexops.tracking.store import StageRun, open_store
from chexops.tracking.trial import STUDY_TAG, TRIAL_NUMBER_TAG, TRIAL_TAG
from chexops.tuning.report import PRUNED_AFTER

SUMMARY_TAG = "chexops.tune.summary"
EXP_ATTR = "chexops.dvc_experiment"   # trial user attributes: its DVC experiment name,
RUN_ATTR = "chexops.mlflow_run_id"    # its MLflow trial run,
WORKER_ATTR = "chexops.worker"        # <host>:<pid> of the worker that ran it,
SURPLUS_ATTR = "chexops.surplus"      # set when it was asked with the study full (never ran)
REPORT_DIR = Path("reports/tune")
PLOTS = {"optimization_history.png": "plot_optimization_history",
         "param_importances.png": "plot_param_importances",
         "parallel_coordinate.png": "plot_parallel_coordinate"}


def metric_name(params: Params) -> str:
    """The objective's key in metrics/evaluate.json: tune.metric, or for auto the AUROC of the
    one target (the mean AUROC of several)."""
    if params.tune.metric != "auto":
        return params.tune.metric
    return f"{params.targets[0]}.auroc" if len(params.targets) == 1 else "mean.auroc"


def experiment_metrics(root: Path, name: str) -> dict[str, Any] | None:
    """metrics/evaluate.json of the DVC experiment `name` (its newest ref), or None."""
    refs = git.output(root, "for-each-ref", "--sort=-committerdate", "--format=%(refname)",
                      "refs/exps/") or ""
    ref = next((r for r in refs.split() if r.rsplit("/", 1)[-1] == name), None)
    text = git.output(root, "show", f"{ref}:metrics/evaluate.json") if ref else None
    return json.loads(text) if text else None


def objective(params: Params, metrics: dict[str, Any] | None) -> tuple[float | None, str]:
    """(value, "") of the objective in an experiment's evaluate metrics, or (None, why not)."""
    name = metric_name(params)
    if metrics is None:
        return None, "its experiment has no metrics/evaluate.json"
    node: Any = metrics
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        note = metrics.get(name.split(".")[0], {}).get("note") if isinstance(metrics, dict) else None
        return None, f"{name} is {node!r} in its metrics/evaluate.json" + (f" ({note})" if note else "")
    return float(node), ""


def trial_run_id(params: Params, root: Path, study: str, number: int) -> str | None:
    """The MLflow trial run of trial `number` (None when every stage came from DVC's cache)."""
    client, exp_id = open_store(params, root)
    found = client.search_runs([exp_id], f"tags.`{STUDY_TAG}` = '{study}' and "
                                         f"tags.`{TRIAL_NUMBER_TAG}` = '{number}' and "
                                         f"tags.`{TRIAL_TAG}` = 'true'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


# ---------------------------------------------------------------- the study's summary

def summary(params: Params, study: Any, url: str) -> dict[str, Any]:
    """The study as JSON: counts by state, every trial, and the best one."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "experiment": t.user_attrs.get(EXP_ATTR),
             "mlflow_run_id": t.user_attrs.get(RUN_ATTR),
             "pruned_after_round": t.user_attrs.get(PRUNED_AFTER),
             "intermediate": {str(k): v for k, v in t.intermediate_values.items()}}
            for t in trials]
    complete = [r for r in rows if r["state"] == TrialState.COMPLETE.name]
    pick = max if params.tune.direction == "maximize" else min
    best = pick(complete, key=lambda r: r["value"]) if complete else None
    counts = {s.name.lower(): sum(r["state"] == s.name for r in rows) for s in TrialState}
    return {"study": study.study_name, "storage": redact_url(url), "metric": metric_name(params),
            "direction": params.tune.direction, "counts": counts, "best": best, "trials": rows}


def draw_plots(study: Any) -> dict[str, Any]:
    """{file name: matplotlib figure} of Optuna's plots; a plot the study cannot give yet (too
    few finished trials) is left out."""
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as optuna_plots

    figures = {}
    for name, function in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning, "too few trials" notes
            try:
                axes = getattr(optuna_plots, function)(study)
            except (ValueError, RuntimeError, ZeroDivisionError, ExperimentalWarning):
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(9, 5)
        figures[name] = figure
        plt.close(figure)  # pyplot lets go of it; the object stays usable
    return figures


def write_report(root: Path, found: dict[str, Any], figures: dict[str, Any]) -> Path:
    """reports/tune/<study>/ in the main repository: summary.json and the plots, swapped in whole."""
    out = main_repo_root(root) / REPORT_DIR / found["study"]
    with atomic.atomic_dir(out) as tmp:
        (tmp / "summary.json").write_text(json.dumps(found, indent=2, default=str))
        for name, figure in figures.items():
            figure.savefig(tmp / name, bbox_inches="tight")
    return out


def _summary_run(client: Any, exp_id: str, study: str) -> str:
    """The study's one summary run: found, or made; of two made at once the older stays."""
    query = f"tags.`{SUMMARY_TAG}` = 'true' and tags.`{STUDY_TAG}` = '{study}'"

    def oldest() -> Any:
        found = client.search_runs([exp_id], query, max_results=100)
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)) if found else None

    run = oldest()
    if run is not None:
        return run.info.run_id
    mine = client.create_run(exp_id, run_name=f"tune-{study}",
                             tags={SUMMARY_TAG: "true", STUDY_TAG: study}).info.run_id
    keep = oldest().info.run_id
    if keep != mine:
        client.delete_run(mine)
    else:
        client.set_terminated(mine, "FINISHED")
    return keep


def log_summary(params: Params, root: Path, found: dict[str, Any], report: Path) -> str:
    """The summary on the study's MLflow run: best trial tags, counts and best value (one point
    per number of finished trials), the report folder as artifacts. Returns the run id."""
    client, exp_id = open_store(params, root)
    run = StageRun(client, _summary_run(client, exp_id, found["study"]), exp_id)
    best = found["best"] or {}
    run.set_tags({"chexops.tune.metric": found["metric"], "chexops.tune.direction": found["direction"],
                  "chexops.tune.storage": found["storage"],
                  "chexops.tune.best_trial": best.get("number"),
                  "chexops.tune.best_experiment": best.get("experiment"),
                  "chexops.tune.best_run_id": best.get("mlflow_run_id")})
    counts = found["counts"]
    step = counts["complete"] + counts["pruned"]
    run.log_metrics_once({"best_value": best.get("value"), **{f"trials_{k}": counts[k]
                          for k in ("complete", "pruned", "fail")}}, step=step)
    run.log_artifact(report, "tune")
    return run.run_id
