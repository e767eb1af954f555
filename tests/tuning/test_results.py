"""What a study reports: the objective read from evaluate's validation metrics, the summary
with the best trial, Optuna's plots written and logged once to one MLflow summary run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from chexops.config import load_params
from chexops.tuning import results

REPO = Path(__file__).resolve().parents[2]
EVALUATE = {"Cardiomegaly": {"auroc": 0.71, "error_rate": 0.2, "tta": {"auroc": 0.73}},
            "Edema": {"auroc": None, "note": "validation split holds only negative cases"}}


def params_with(targets=("Cardiomegaly",), **tune):
    base = load_params(REPO / "params.yaml")
    return dataclasses.replace(base, targets=targets, tune=dataclasses.replace(base.tune, **tune))


@pytest.mark.parametrize("params, found", [
    (params_with(), (0.71, "")),
    (params_with(metric="Cardiomegaly.tta.auroc"), (0.73, "")),
    (params_with(targets=("Edema",)), (None, "Edema.auroc is None in its metrics/evaluate.json "
                                             "(validation split holds only negative cases)")),
    (params_with(metric="Cardiomegaly.sensitivity"),
     (None, "Cardiomegaly.sensitivity is None in its metrics/evaluate.json")),
])
def test_the_objective_is_a_validation_metric_of_evaluate(params, found):
    assert results.objective(params, EVALUATE) == found
    assert results.objective(params, None) == (None, "its experiment has no metrics/evaluate.json")


def test_auto_is_the_auroc_of_the_one_target_or_the_mean():
    assert results.metric_name(params_with()) == "Cardiomegaly.auroc"
    assert results.metric_name(params_with(targets=("Cardiomegaly", "Edema"))) == "mean.auroc"
    assert results.metric_name(params_with(metric="Cardiomegaly.error_rate")) == "Cardiomegaly.error_rate"


def finished_study() -> optuna.Study:
    """Three complete trials, one pruned, one failed, with the attributes a worker records."""
    study = optuna.create_study(direction="maximize")
    dists = {"lr": FloatDistribution(1e-4, 1e-2, log=True),
             "train.augment.preset": CategoricalDistribution(["none", "light"])}
    for i, (lr, preset, value) in enumerate([(1e-3, "none", 0.6), (3e-3, "light", 0.8),
                                             (5e-4, "none", 0.55)]):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "train.augment.preset": preset}, distributions=dists, value=value,
            intermediate_values={1: value - 0.1, 2: value},
            user_attrs={"chexops.dvc_experiment": f"s-t{i}", "chexops.mlflow_run_id": f"run{i}"}))
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-4, "train.augment.preset": "none"}, distributions=dists,
        state=TrialState.PRUNED, intermediate_values={1: 0.3},
        user_attrs={"chexops.pruned_after_round": 1}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    return study


def test_the_summary_names_the_best_trial_and_counts_every_state():
    found = results.summary(params_with(), finished_study(), "sqlite:////x/optuna.db")
    assert found["best"]["number"] == 1 and found["best"]["value"] == 0.8
    assert found["best"]["experiment"] == "s-t1" and found["best"]["mlflow_run_id"] == "run1"
    assert {k: v for k, v in found["counts"].items() if v} == {"complete": 3, "pruned": 1, "fail": 1}
    assert found["trials"][3]["pruned_after_round"] == 1
    low = results.summary(params_with(direction="minimize"), finished_study(), "sqlite:////x")
    assert low["best"]["number"] == 2


def test_plots_are_written_and_logged_once_to_one_summary_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, study = params_with(), finished_study()
    found = results.summary(params, study, "sqlite:////x/optuna.db")
    figures = results.draw_plots(study)
    assert set(figures) == set(results.PLOTS)
    report = results.write_report(tmp_path, found, figures)
    assert report == tmp_path.resolve() / "reports/tune" / study.study_name
    assert sorted(p.name for p in report.iterdir()) == sorted([*results.PLOTS, "summary.json"])
    assert json.loads((report / "summary.json").read_text())["best"]["number"] == 1
    first = results.log_summary(params, tmp_path, found, report)
    again = results.log_summary(params, tmp_path, found, report)  # a second worker ends
    assert again == first
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first)
    assert run.data.tags["chexops.tune.best_experiment"] == "s-t1"
    assert run.data.tags["chexops.tune.best_run_id"] == "run1"
    assert [m.value for m in client.get_metric_history(first, "best_value")] == [0.8]  # not twice
    logged = {a.path for a in client.list_artifacts(first, "tune")}
    assert logged == {f"tune/{name}" for name in [*results.PLOTS, "summary.json"]}


def test_a_study_without_a_finished_trial_still_draws_its_plots(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    figures = results.draw_plots(study)  # empty axes: every worker may end before a trial does
    report = results.write_report(tmp_path, results.summary(params_with(), study, "x"), figures)
    assert json.loads((report / "summary.json").read_text())["best"] is None
