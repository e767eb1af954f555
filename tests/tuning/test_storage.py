"""The study storage: where a relative SQLite URL points (also from a DVC temp workspace), a
storage that cannot be reached as one line, the heartbeat that fails a dead worker's trial, and
a study's direction kept."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from chexops.config import load_params
from chexops.errors import ChexopsError
from chexops.tuning import storage

REPO = Path(__file__).resolve().parents[2]


def params_with(**tune):
    base = load_params(REPO / "params.yaml")
    return dataclasses.replace(base, tune=dataclasses.replace(base.tune, **tune))


def test_a_relative_sqlite_url_means_the_main_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("CHEXOPS_MAIN_ROOT", raising=False)
    params = params_with(storage="sqlite:///optuna.db")
    assert storage.storage_url(params, tmp_path) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    temp = tmp_path / ".dvc/tmp/exps/standalone/tmpab12"  # a `dvc exp run --temp` workspace
    assert storage.storage_url(params, temp) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    absolute = params_with(storage=f"sqlite:////{tmp_path}/x.db".replace("/////", "////"))
    assert storage.storage_url(absolute, temp) == absolute.tune.storage
    server = params_with(storage="postgresql://tune@db.example/studies")
    assert storage.storage_url(server, temp) == "postgresql://tune@db.example/studies"


@pytest.mark.parametrize("url, words", [
    ("sqlite:///{tmp}/a-file/optuna.db", "cannot be reached"),  # a folder that cannot exist
    ("postgresql://tune:s3cret@127.0.0.1:1/studies", "tune.storage postgresql://127.0.0.1:1/studies"),
])
def test_a_storage_that_cannot_be_reached_is_one_line_without_secrets(tmp_path, url, words):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ChexopsError) as info:
        storage.open_storage(url.format(tmp=tmp_path))
    message = str(info.value)
    assert words in message and "\n" not in message and "s3cret" not in message
    # without its driver a server URL says which to install; with it, the refused connection
    assert "cannot be reached" in message or "driver is not installed" in message


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the worker beats, not optimize
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_dead_workers_trial_goes_stale_and_is_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    store = storage.open_storage(url, heartbeat_s=1)
    study = storage.load_study(params_with(), url, "s", store)
    trial = study.ask()
    store.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.RUNNING  # its heartbeat is fresh
    time.sleep(3)  # past the grace period (2 x heartbeat_s): its worker is gone
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.FAIL


def test_a_study_keeps_its_direction(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage.load_study(params_with(), url, "s")
    again = storage.load_study(params_with(), url, "s")
    assert again.direction == optuna.study.StudyDirection.MAXIMIZE
    with pytest.raises(ChexopsError, match="'s' in .* is set to maximize, not tune.direction: minimize"):
        storage.load_study(params_with(direction="minimize"), url, "s")


def test_the_pruner_follows_params():
    on = storage.make_pruner(params_with().tune.pruner)
    assert isinstance(on, optuna.pruners.MedianPruner)
    off = params_with(pruner=dataclasses.replace(params_with().tune.pruner, kind="none"))
    assert isinstance(storage.make_pruner(off.tune.pruner), optuna.pruners.NopPruner)
