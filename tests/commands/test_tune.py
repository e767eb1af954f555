"""`chexops tune` refuses bad input with one line and exit 2 before anything trains: an unknown
param, an empty or reversed range, a distribution that does not exist, a storage that cannot be
reached, and the command's own arguments. (The search itself: tests/pipeline/test_tune.py.)"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from chexops import cli

REPO = Path(__file__).resolve().parents[2]


def make_repo(root: Path, space: dict | None = None, **tune) -> Path:
    """A folder that looks like the pipeline's repository, with the shipped params changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"].update(tune)
    if space is not None:
        params["tune"]["space"] = space
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".dvc").mkdir()
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    return root


def tune(root: Path, capsys, *args: str) -> tuple[int, list[str]]:
    code = cli.main(["--root", str(root), "tune", *(args or ("--trials", "2"))])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("space, tune_settings, message", [
    ({"train.lrr": {"uniform": [0.1, 0.2]}}, {}, "tune.space: unknown param 'train.lrr'"),
    ({"rounds.r2.lr": {"log_uniform": [1e-3, 1e-4]}}, {},
     "tune.space.rounds.r2.lr.log_uniform: range [0.001, 0.0001] is empty or reversed"),
    ({"lr": {"uniform": [0.01, 0.01]}}, {}, "tune.space.lr.uniform: range [0.01, 0.01] is empty"),
    ({"lr": {"normal": [0.1, 0.2]}}, {}, "unknown key tune.space.lr.normal in params.yaml"),
    ({}, {}, "tune.space in params.yaml is empty"),
    (None, {"storage": "sqlite:///{root}/a-file/optuna.db"}, "cannot be reached"),
    (None, {"storage": "optuna.db"}, "tune.storage: 'optuna.db' is not a database URL"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, space, tune_settings, message):
    settings = {k: v.format(root=tmp_path) for k, v in tune_settings.items()}
    root = make_repo(tmp_path, space, **settings)
    (tmp_path / "a-file").write_text("a file, so no folder can be made under it")
    code, err = tune(root, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("chexops tune: error: ") and message in err[0], err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("args, message", [
    (("--trials", "0"), "--trials 0: give the number of trials, at least 1"),
    (("--trials", "2", "--timeout", "-5"), "--timeout -5.0: give seconds > 0"),
    (("--trials", "2", "--study", "my study"), "tune.study: 'my study' must be"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    code, err = tune(make_repo(tmp_path), capsys, *args)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_another_params_file_is_refused(tmp_path, capsys):
    root = make_repo(tmp_path)
    (root / "other.yaml").write_text((root / "params.yaml").read_text())
    code = cli.main(["--root", str(root), "--params", "other.yaml", "tune", "--trials", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--params other.yaml: the trials run `dvc exp run -S`" in err[0]


def test_outside_the_pipelines_repository_it_refuses(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    code, err = tune(tmp_path, capsys)
    assert code == 2 and "is not the pipeline's repository" in err[0]


def test_a_new_study_never_reuses_experiment_names_of_an_older_one(tmp_path, capsys):
    root = make_repo(tmp_path)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    subprocess.run([*git, "update-ref", "refs/exps/ab/cdef/chexops-t0", "HEAD"], check=True)
    code, err = tune(root, capsys)
    assert code == 2 and len(err) == 1, err
    assert ("study 'chexops' is new in its storage, but DVC experiments chexops-t0 exist from an "
            "earlier study of that name") in err[0]
