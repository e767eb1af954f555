"""A round in a tuning trial, against a real SQLite study: it reports its best validation AUROC
(step = round), a trial behind the median is marked pruned after that round and stopped before
the next one (exit 3 through the CLI), the last round is never pruned, and outside a study
nothing happens."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from chexops import cli
from chexops.config import load_params
from chexops.errors import TrialPruned
from chexops.tracking import trial as mlflow_trial
from chexops.tuning import report, storage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def params():
    base = load_params(REPO / "params.yaml")
    pruner = dataclasses.replace(base.tune.pruner, kind="median", startup_trials=1)
    return dataclasses.replace(base, tune=dataclasses.replace(base.tune, pruner=pruner))


@pytest.fixture()
def in_trial(tmp_path, params, monkeypatch):
    """A study whose one finished trial reached AUROC 0.9 in rounds 2-5, and a new trial; the
    environment a tune worker gives the new trial's stages. Returns (storage, trial id)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = storage.load_study(params, url, "s")
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)},
        value=0.9, intermediate_values={k: 0.9 for k in range(2, 6)}))
    new = study.ask()
    for key, value in {mlflow_trial.TUNE_STORAGE_ENV: url, mlflow_trial.TUNE_STUDY_ENV: "s",
                       mlflow_trial.TUNE_TRIAL_ENV: str(new.number),
                       mlflow_trial.TUNE_TRIAL_ID_ENV: str(new._trial_id)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return storage.open_storage(url), new._trial_id


def test_a_round_behind_the_median_prunes_the_trial_before_the_next_round(params, in_trial):
    store, trial_id = in_trial
    assert report.report_round(params, 3, 0.6) is True  # behind the finished trial's 0.9
    frozen = store.get_trial(trial_id)
    assert frozen.intermediate_values == {3: 0.6}
    assert frozen.state == TrialState.RUNNING  # the worker tells it PRUNED once dvc stops
    assert report.pruned_after(store, trial_id) == 3
    report.stop_if_pruned(3)  # the round that was pruned after has already ended
    with pytest.raises(TrialPruned, match=r"trial 1 of study s was pruned after round 3") as info:
        report.stop_if_pruned(4)
    assert info.value.after_round == 3


def test_a_round_ahead_of_the_median_goes_on(params, in_trial):
    store, trial_id = in_trial
    assert report.report_round(params, 2, 0.95) is False
    assert report.report_round(params, 3, 0.6) is False  # the median pruner weighs its best round
    assert store.get_trial(trial_id).intermediate_values == {2: 0.95, 3: 0.6}
    assert report.pruned_after(store, trial_id) is None
    report.stop_if_pruned(4)


def test_the_last_round_reports_but_is_never_pruned(params, in_trial):
    store, trial_id = in_trial
    assert report.report_round(params, 5, 0.1) is False  # only evaluate would be saved
    assert store.get_trial(trial_id).intermediate_values == {5: 0.1}
    assert report.pruned_after(store, trial_id) is None


def test_the_cli_stops_a_pruned_trials_round_with_exit_3(tmp_path, params, in_trial, capsys):
    store, trial_id = in_trial
    store.set_trial_user_attr(trial_id, report.PRUNED_AFTER, 2)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert cli.main(["--root", str(tmp_path), "train-round", "3"]) == cli.PRUNED_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chexops train-round: trial 1 of study s was pruned after round 2 (its best "
                   "validation AUROC fell below the median of the finished trials)"]


def test_outside_a_study_a_round_reports_nothing(params, monkeypatch):
    for key in (mlflow_trial.TUNE_STORAGE_ENV, mlflow_trial.TUNE_STUDY_ENV,
                mlflow_trial.TUNE_TRIAL_ID_ENV):
        monkeypatch.delenv(key, raising=False)
    assert report.report_round(params, 2, 0.1) is False
    report.stop_if_pruned(5)
