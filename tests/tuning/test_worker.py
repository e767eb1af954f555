"""The worker's bookkeeping against a real SQLite study: exactly N trials (a trial asked when the
study is already full is given up at once), a full study needs no trial, and what a trial's
stages learn from the environment. (Running trials: tests/pipeline/test_tune.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.trial import TrialState

from chexops.config import load_params
from chexops.tracking import trial as mlflow_trial
from chexops.tuning import storage, worker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def study_worker(tmp_path):
    params = load_params(REPO / "params.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    store = storage.open_storage(url)
    study = storage.load_study(params, url, "s", store)
    return worker.Worker(params, tmp_path, url, study, store, n_trials=2, deadline=None)


def test_a_trial_asked_when_the_study_is_full_is_surplus(study_worker):
    study = study_worker.study
    done, running = study.ask(), study.ask()
    study.tell(done, 0.5)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)  # a failed trial frees its place
    late = study.ask()  # asked at the same instant as `running`'s worker asked
    assert worker._surplus(study_worker, running.number) is False
    assert worker._surplus(study_worker, late.number) is True
    study_worker.n_trials = 3
    assert worker._surplus(study_worker, late.number) is False


def test_a_full_study_runs_no_trial(study_worker):
    for value in (0.5, 0.6):
        trial = study_worker.study.ask()
        study_worker.study.tell(trial, value)
    assert worker.run(study_worker) == []
    assert len(study_worker.study.get_trials()) == 2


def test_a_trials_stages_learn_it_from_the_environment(study_worker):
    trial = study_worker.study.ask()
    env = worker.trial_env(study_worker, trial, {"rounds.r2.lr": 1e-4, "train.augment.preset": "none"})
    assert env[mlflow_trial.TUNE_STORAGE_ENV] == study_worker.url
    assert env[mlflow_trial.TUNE_STUDY_ENV] == "s"
    assert env[mlflow_trial.TUNE_TRIAL_ENV] == str(trial.number)
    assert env[mlflow_trial.TUNE_TRIAL_ID_ENV] == str(trial._trial_id)
    assert json.loads(env[mlflow_trial.TUNE_VALUES_ENV]) == {"rounds.r2.lr": 1e-4,
                                                             "train.augment.preset": "none"}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_stays_alive_from_ask_to_tell_and_goes_stale_after(tmp_path):
    """The heartbeat runs through the whole trial, also while its worker reads the results after
    dvc ended (seconds of MLflow and git under load): another worker must not fail it then."""
    import time

    import optuna

    params = load_params(REPO / "params.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    store = storage.open_storage(url, heartbeat_s=1)
    study = storage.load_study(params, url, "s", store)
    other = storage.load_study(params, url, "s", storage.open_storage(url, heartbeat_s=1))
    trial = study.ask()
    with worker.heartbeat(store, trial._trial_id, 1):
        time.sleep(3.5)  # past the grace period (2 s): only the heartbeat keeps it running
        optuna.storages.fail_stale_trials(other)
        assert other.get_trials()[0].state == TrialState.RUNNING
    time.sleep(3.5)  # its worker is gone
    optuna.storages.fail_stale_trials(other)
    assert other.get_trials()[0].state == TrialState.FAIL
