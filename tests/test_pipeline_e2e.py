"""The real nine-stage DVC pipeline, reduced, end to end: `make repro`, `dvc exp run -S lr=...`,
`dvc exp show`, and what lands in the MLflow store."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params, run

pytestmark = pytest.mark.slow

STAGES = ["download", "clean", "resample"] + [f"train-round-{k}" for k in range(1, 6)] + ["evaluate"]
ROUND_METRICS = {"train_loss", "valid_loss", "auroc", "precision", "recall", "error_rate", "lr"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A reduced copy of the repo after `make repro` (the README's pipeline command)."""
    dest = make_repo_copy(tmp_path_factory.mktemp("pipeline"), reduced_params())
    # -o setup: use this test run's venv instead of installing a new one
    run(["make", "-o", "setup", "repro", f"VENV={VENV_BIN.parent}"], dest, pipeline_env())
    return dest


def client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def all_runs(repo: Path) -> list:
    c = client(repo)
    exp = c.get_experiment_by_name("chexops")
    assert exp is not None, "no 'chexops' experiment in the embedded store"
    return c.search_runs([exp.experiment_id], max_results=1000)


def trial_runs(runs: list) -> list:
    return sorted((r for r in runs if r.data.tags.get("chexops.trial") == "true"),
                  key=lambda r: r.info.start_time)


def children(runs: list, trial) -> dict:
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
    return {r.data.tags["chexops.stage"]: r for r in kids}


def lock_out_md5s(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def test_all_nine_stages_ran_and_are_locked(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    for k in range(1, 6):
        assert (repo / f"models/round-{k}/best.safetensors").stat().st_size > 1_000_000
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluation["Cardiomegaly"]["auroc"] <= 1.0


def test_noop_repro_has_nothing_to_do(repo):
    status = run(["dvc", "status"], repo, pipeline_env()).stdout
    assert "up to date" in status


def test_trial_run_has_a_child_per_stage_with_round_metrics(repo):
    runs = all_runs(repo)
    trials = trial_runs(runs)
    assert len(trials) == 1
    trial = trials[0]
    kids = children(runs, trial)
    assert set(kids) == set(STAGES)
    assert "evaluate.Cardiomegaly.auroc" in trial.data.metrics or any(
        k.endswith("auroc") for k in trial.data.metrics)
    assert trial.data.params["lr"] == str(reduced_params()["lr"])
    c = client(repo)
    for k in range(1, 6):
        kid = kids[f"train-round-{k}"]
        assert ROUND_METRICS <= set(kid.data.metrics), kid.data.metrics
        assert len(c.get_metric_history(kid.info.run_id, "auroc")) == 1  # one epoch per round
        artifacts = _artifact_paths(c, kid.info.run_id)
        assert any("confusion" in a and a.endswith(".json") for a in artifacts), artifacts
        assert any(a.endswith(".safetensors") for a in artifacts), artifacts
    assert any("confusion" in a for a in _artifact_paths(c, kids["evaluate"].info.run_id))


def test_data_hash_tags_equal_dvc_lock(repo):
    md5s = lock_out_md5s(repo)
    runs = all_runs(repo)
    kids = children(runs, trial_runs(runs)[0])
    checked = 0
    for stage, kid in kids.items():
        for tag, value in kid.data.tags.items():
            if tag.startswith("data.md5."):
                path = tag[len("data.md5."):]
                if path in md5s:
                    assert value == md5s[path], (stage, path)
                    checked += 1
    assert checked >= 6  # every training round names data/resampled at least


def test_rerun_of_a_round_is_bit_identical(repo):
    weights = repo / "models/round-1/best.safetensors"
    before = hashlib.md5(weights.read_bytes()).hexdigest()
    metrics_before = json.loads((repo / "metrics/round-1.json").read_text())
    run(["dvc", "repro", "-f", "-s", "train-round-1"], repo, pipeline_env())
    assert hashlib.md5(weights.read_bytes()).hexdigest() == before
    assert json.loads((repo / "metrics/round-1.json").read_text()) == metrics_before


def test_exp_run_set_param_lr_changes_round_one_and_lands_as_a_new_trial(repo):
    env = pipeline_env()
    run(["dvc", "exp", "run", "-n", "lr-small", "-S", "lr=0.0005"], repo, env)
    runs = all_runs(repo)
    trials = trial_runs(runs)
    assert len(trials) == 2
    newest = trials[-1]
    assert newest.data.tags.get("dvc.exp_name") == "lr-small"
    kids = children(runs, newest)
    assert float(kids["train-round-1"].data.params["lr"]) == pytest.approx(5e-4)
    # data stages were cached: linked by tag, not re-run
    assert "download" not in kids
    assert newest.data.tags.get("stage.download.run_id")
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    assert "lr-small" in json.dumps(shown)


def _artifact_paths(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in c.list_artifacts(run_id, path):
        out.extend(_artifact_paths(c, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_plots_show_renders(repo):
    out = run(["dvc", "plots", "show", "--json"], repo, pipeline_env()).stdout
    rendered = json.loads(out)
    names = json.dumps(rendered)
    assert "plots/evaluate/roc.csv" in names and "plots/round-1/history.csv" in names
