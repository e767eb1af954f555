"""MLflow tracking against a real embedded SQLite store in tmp_path (one store per module:
creating a store costs seconds)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chexops import paths, redact
from chexops.config import load_params
from chexops.errors import ChexopsError
from chexops.tracking import runs as tracking
from chexops.tracking import store, trial

REPO = Path(__file__).resolve().parents[2]
ZIP_BYTES = b"zip bytes"

DVC_YAML = {"stages": {
    "download": {"cmd": "x", "deps": ["src/chexops/data/download.py"], "outs": ["data/raw"]},
    "clean": {"cmd": "x", "deps": ["src/chexops/data/clean.py", "data/raw/chexpert.zip"],
              "outs": ["data/clean"]},
    "evaluate": {"cmd": "x", "deps": ["data/raw"], "outs": ["runs/evaluate.json"]},
}}
DVC_LOCK = {"schema": "2.0", "stages": {"download": {"cmd": "x", "outs": [
    {"path": "data/raw", "hash": "md5", "md5": "a" * 32 + ".dir", "size": 9, "nfiles": 1}]}}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repo holding a small dvc.yaml/dvc.lock and one data file."""
    root = tmp_path_factory.mktemp("repo")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "dvc.lock").write_text(yaml.safe_dump(DVC_LOCK, sort_keys=False))
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/chexpert.zip").write_bytes(ZIP_BYTES)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "dvc.yaml"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
    return root


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_stage_run_logs_tags_params_metrics_and_writes_runs_file(repo, params):
    with tracking.stage_run(params, repo, "clean") as run:
        run.log_params({"epochs": 3, "lr": 0.003})
        run.log_metrics({"auroc": 0.6, "skipped": None}, step=0)
        run.log_metrics({"auroc": 0.7}, step=1)
        run.log_dict({"tn": 1}, "confusion.json")
    got = client(repo).get_run(run.run_id)
    tags = got.data.tags
    assert got.info.status == "FINISHED"
    assert tags["chexops.stage"] == "clean" and tags["seed"] == str(params.seed)
    assert tags["data.md5.data/raw/chexpert.zip"] == hashlib.md5(ZIP_BYTES).hexdigest()
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] == "False"
    assert tags["lib.mlflow"].startswith("3.") and "lib.torch" in tags
    assert "dvc.exp_name" not in tags
    assert got.data.params == {"epochs": "3", "lr": "0.003"}
    history = client(repo).get_metric_history(run.run_id, "auroc")
    assert [(m.step, m.value) for m in history] == [(0, 0.6), (1, 0.7)]
    assert "skipped" not in got.data.metrics
    inputs = got.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == \
        [("data/raw/chexpert.zip", hashlib.md5(ZIP_BYTES).hexdigest())]
    artifacts = {a.path for a in client(repo).list_artifacts(run.run_id)}
    assert {"config", "confusion.json"} <= artifacts
    assert (repo / "mlartifacts").is_dir()  # the embedded artifact folder at the repo root
    record = json.loads((repo / "runs/clean.json").read_text())
    assert record == {"run_id": run.run_id, "experiment_id": run.experiment_id, "stage": "clean"}


def test_log_metrics_once_skips_a_step_already_logged(repo, params):
    with tracking.stage_run(params, repo, "clean") as run:
        run.log_metrics_once({"auroc": 0.6, "loss": 1.0}, step=1)
        run.log_metrics_once({"auroc": 0.6, "loss": 1.0}, step=1)  # a resume re-reports it
        run.log_metrics_once({"auroc": 0.7, "loss": 0.9}, step=2)
    for key, values in {"auroc": [0.6, 0.7], "loss": [1.0, 0.9]}.items():
        history = client(repo).get_metric_history(run.run_id, key)
        assert sorted((m.step, m.value) for m in history) == list(zip([1, 2], values))


def test_failed_stage_is_marked_failed_and_writes_no_runs_file(repo, params):
    # the module's repo is shared: another test's download run may have written the file
    # already; this failed run must neither write nor replace it
    runs_file = repo / "runs/download.json"
    before = runs_file.read_bytes() if runs_file.exists() else None
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(params, repo, "download") as run:
            raise RuntimeError("boom")
    assert client(repo).get_run(run.run_id).info.status == "FAILED"
    after = runs_file.read_bytes() if runs_file.exists() else None
    assert after == before
    assert run.run_id.encode() not in (after or b"")


def test_resume_continues_the_same_run(repo, params):
    with tracking.stage_run(params, repo, "download") as first:
        first.log_metrics({"loss": 1.0}, step=0)
    with tracking.stage_run(params, repo, "download", resume_run_id=first.run_id) as again:
        again.log_metrics({"loss": 0.5}, step=1)
    assert again.run_id == first.run_id
    assert len(client(repo).get_metric_history(first.run_id, "loss")) == 2
    with pytest.raises(ChexopsError, match="cannot resume"):
        with tracking.stage_run(params, repo, "download", resume_run_id="0" * 32):
            pass


def test_close_trial_adopts_executed_runs_and_links_cached_ones(repo, params, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")
    c = client(repo)
    with tracking.stage_run(params, repo, "download") as cached:
        pass
    c.set_tag(cached.run_id, "mlflow.parentRunId", "an-earlier-trial")  # made by a past trial
    with tracking.stage_run(params, repo, "clean") as executed:
        pass
    with tracking.stage_run(params, repo, "evaluate") as evaluate:
        pass
    metrics = {"evaluate": {"Cardiomegaly": {"auroc": 0.8, "confusion": [[1, 2], [3, 4]],
                                             "note": None}}}
    trial_id = trial.close_trial(params, repo, evaluate, metrics)
    made = c.get_run(trial_id)
    assert made.info.run_name == "exp-one" and made.info.status == "FINISHED"
    assert made.data.tags["chexops.trial"] == "true" and made.data.tags["dvc.exp_name"] == "exp-one"
    assert made.data.tags["stage.download.run_id"] == cached.run_id
    assert made.data.tags["data.md5.data/raw"] == "a" * 32 + ".dir"
    assert {d.dataset.name: d.dataset.digest for d in made.inputs.dataset_inputs}[
        "data/raw"] == "a" * 32 + ".dir"  # the trial logs its data as MLflow inputs too
    assert made.data.params["lr"] == str(params.lr)
    assert made.data.params["rounds.r2.lr"] == str(list(params.round(2).lr))
    assert made.data.metrics == {"evaluate.Cardiomegaly.auroc": 0.8}
    for kid in (executed, evaluate):
        assert c.get_run(kid.run_id).data.tags["mlflow.parentRunId"] == trial_id
    assert c.get_run(cached.run_id).data.tags["mlflow.parentRunId"] == "an-earlier-trial"


def test_unreachable_server_fails_fast_with_redacted_uri(monkeypatch, params, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}?token=abc")
    with pytest.raises(ChexopsError, match="unreachable; start it or unset") as err:
        with tracking.stage_run(params, tmp_path, "clean"):
            pytest.fail("the stage body must not run")
    assert "secret" not in str(err.value) and "abc" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_temp_workspace_maps_to_the_main_store(tmp_path, params, monkeypatch):
    workspace = tmp_path / "repo/.dvc/tmp/exps/tmpab12cd"
    assert paths.main_repo_root(workspace) == tmp_path / "repo"
    assert paths.main_repo_root(tmp_path / "repo") == tmp_path / "repo"
    assert store.tracking_uri(params, workspace) == f"sqlite:///{tmp_path}/repo/mlflow.db"
    assert store.artifact_location(params, workspace) == (tmp_path / "repo/mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert store.tracking_uri(params, workspace) == "http://mlflow.example:5000"


def test_relative_sqlite_uri_means_the_main_repo_from_any_workspace(tmp_path, params, monkeypatch):
    """`MLFLOW_TRACKING_URI=sqlite:///mlflow.db dvc exp run --temp` must not write a store inside
    the temporary copy that DVC deletes afterwards."""
    workspace = tmp_path / "repo/.dvc/tmp/exps/tmpab12cd"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert store.tracking_uri(params, workspace) == f"sqlite:///{tmp_path}/repo/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/team.db")
    assert store.tracking_uri(params, tmp_path / "repo") == f"sqlite:///{tmp_path}/repo/stores/team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")  # absolute
    assert store.tracking_uri(params, workspace) == f"sqlite:///{tmp_path}/elsewhere.db"
    # chexops reproduce's workspace declares the user's repo
    monkeypatch.setenv(paths.MAIN_ROOT_ENV, str(tmp_path / "repo"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert store.tracking_uri(params, tmp_path / "ws") == f"sqlite:///{tmp_path}/repo/mlflow.db"


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file:///tmp/mlruns"])
def test_a_file_store_uri_is_refused_with_the_fix(uri, params, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ChexopsError, match=r"is a file store, which MLflow no longer supports; "
                                           r"use sqlite:///mlflow.db"):
        store.tracking_uri(params, tmp_path)


def test_redact_and_ui_command(params, tmp_path):
    assert redact.redact_url("https://u:p@host/x?sig=1") == "https://host/x?***"
    assert redact.redact_url("sqlite:////a/b.db") == "sqlite:////a/b.db"
    argv = store.ui_command(params, tmp_path / ".dvc/tmp/exps/x", port=5123)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[-1] == "5123"


def test_numeric_metrics_keeps_numbers_only():
    got = store.numeric_metrics({"a": {"auroc": None, "n": 3, "ok": True, "cm": [[1]]}, "b": 0.5})
    assert got == {"a.n": 3.0, "b": 0.5}


def test_store_uses_wal_after_creation(repo, params):
    import sqlite3

    store.open_store(params, repo)
    mode = sqlite3.connect(repo / "mlflow.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"



WRITER = """
import json, sys
from pathlib import Path
from chexops.tracking import runs as tracking
from chexops.config import load_params
from tests.processes import file_barrier
params = load_params(sys.argv[1])
file_barrier(Path(sys.argv[3]), sys.argv[4], 2)  # both open the fresh store together
ids = []
for _ in range(2):
    with tracking.stage_run(params, Path(sys.argv[2]), "evaluate") as run:
        for step in range(10):
            run.log_metrics({"m": step}, step=step)
    ids.append(run.run_id)
print(json.dumps(ids))
"""


def test_two_processes_share_a_fresh_store_without_locking_errors(tmp_path):
    import contextlib

    from tests.processes import group

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    with contextlib.ExitStack() as stack:  # a failure or a hang stops both writers' groups
        procs = [stack.enter_context(group(
            [sys.executable, "-c", WRITER, str(REPO / "params.yaml"), str(tmp_path),
             str(tmp_path / "barrier"), name], cwd=REPO, env=env,
            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for name in "ab"]
        outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    c = client(tmp_path)
    runs = c.search_runs([c.get_experiment_by_name("chexops").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    # the two writers wrote at the same time: their runs' time spans overlap
    by_id = {r.info.run_id: r for r in runs}
    written = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(by_id) == sorted(i for ids in written for i in ids)
    (a0, a1), (b0, b1) = ((min(by_id[i].info.start_time for i in ids),
                           max(by_id[i].info.end_time for i in ids)) for ids in written)
    assert a0 < b1 and b0 < a1, written
