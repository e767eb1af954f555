"""The trial run opened by the first stage of a DVC command, against a real SQLite store: stages
nested at once, a failed stage failing the trial, orphans ended, the dvc process found among the
real process's ancestors, and system metrics on a stage run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from chexops.config import load_params
from chexops.tracking import runs as tracking
from chexops.tracking import trial

REPO = Path(__file__).resolve().parents[2]
DVC_YAML = {"stages": {
    "download": {"cmd": "x", "outs": ["data/raw"]},
    "clean": {"cmd": "x", "deps": ["data/raw"], "outs": ["data/clean"]},
    "evaluate": {"cmd": "x", "deps": ["data/clean"], "outs": ["runs/evaluate.json"]},
}}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """One store for the module (creating one costs seconds); each test has its own experiment."""
    root = tmp_path_factory.mktemp("repo")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    return root


@pytest.fixture()
def repo(store_root, monkeypatch) -> Path:
    for key in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for record in (store_root / "runs").glob("*.json"):  # no stage of an earlier test
        record.unlink()
    return store_root


@pytest.fixture()
def params(request):
    base = load_params(REPO / "params.yaml")
    experiment = request.node.name.replace("[", "-").replace("]", "")[:200]
    return replace(base, tracking=replace(base.tracking, experiment=experiment))


def client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def under_dvc(monkeypatch, key: str, exp_name: str | None = None) -> None:
    """What a DVC stage command sees: DVC_STAGE set, and (here) a fixed dvc process key."""
    monkeypatch.setenv("DVC_STAGE", "x")
    monkeypatch.setattr(trial, "invocation_key", lambda: key)
    if exp_name:
        monkeypatch.setenv("DVC_EXP_NAME", exp_name)


def alive_key() -> str:
    """An invocation key of a process that runs: this test's own."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def test_first_stage_opens_the_trial_and_every_stage_is_nested_at_once(repo, params, monkeypatch):
    under_dvc(monkeypatch, alive_key(), "exp-a")
    c = client(repo)
    with tracking.stage_run(params, repo, "download") as first:
        opened = c.get_run(first.trial_id)
        # while the first stage still works, the UI already shows a running trial with it nested
        assert opened.info.status == "RUNNING" and opened.info.run_name == "exp-a"
        assert opened.data.tags["chexops.trial"] == "true"
        assert opened.data.params["lr"] == str(params.lr)
        assert c.get_run(first.run_id).data.tags["mlflow.parentRunId"] == first.trial_id
    time.sleep(0.05)
    with tracking.stage_run(params, repo, "evaluate") as evaluate:
        assert evaluate.trial_id == first.trial_id
    closed = trial.close_trial(params, repo, evaluate, {"evaluate": {"auroc": 0.8}})
    done = c.get_run(closed)
    assert closed == first.trial_id and done.info.status == "FINISHED"
    assert done.data.metrics == {"evaluate.auroc": 0.8}
    kids = c.search_runs([done.info.experiment_id], f"tags.`mlflow.parentRunId` = '{closed}'")
    assert {k.info.run_id for k in kids} == {first.run_id, evaluate.run_id}
    # the trial's duration is its wall time: from before its first stage to after its last
    assert done.info.start_time <= min(k.info.start_time for k in kids)
    assert done.info.end_time >= max(k.info.end_time for k in kids)


def test_a_failing_stage_fails_the_trial_with_the_stage_and_its_error(repo, params, monkeypatch):
    under_dvc(monkeypatch, alive_key())
    c = client(repo)
    with tracking.stage_run(params, repo, "download") as first:
        pass
    with pytest.raises(RuntimeError):
        with tracking.stage_run(params, repo, "clean") as failing:
            raise RuntimeError("non-finite training loss (nan)\nsecond line")
    error = trial.one_line(RuntimeError("non-finite training loss (nan)\nsecond line"))
    assert trial.fail_trial(params, repo, "clean", error) == first.trial_id
    failed = c.get_run(first.trial_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["chexops.failed_stage"] == "clean"
    assert failed.data.tags["chexops.error"] == "non-finite training loss (nan)"
    assert c.get_run(failing.run_id).info.status == "FAILED"
    assert c.get_run(failing.run_id).data.tags["mlflow.parentRunId"] == first.trial_id


def test_outside_dvc_a_stage_has_no_trial_until_evaluate_makes_one(repo, params):
    with tracking.stage_run(params, repo, "evaluate") as evaluate:
        assert evaluate.trial_id is None
    assert trial.fail_trial(params, repo, "evaluate", "x") is None
    made = trial.close_trial(params, repo, evaluate, {})
    c = client(repo)
    assert c.get_run(made).info.status == "FINISHED"
    assert c.get_run(evaluate.run_id).data.tags["mlflow.parentRunId"] == made


def test_secrets_never_reach_the_error_tag():
    exc = RuntimeError("GET https://user:pw@host/x?X-Amz-Signature=abc failed")
    assert "pw" not in trial.one_line(exc) and "abc" not in trial.one_line(exc)


@pytest.mark.parametrize("stage_status, trial_status", [("RUNNING", "FAILED"),
                                                        ("FINISHED", "FINISHED")])
def test_an_orphaned_trial_is_ended_by_the_next_one(repo, params, monkeypatch, stage_status,
                                                     trial_status):
    dead = f"{socket.gethostname()}:999999999:12.00"  # no such process
    under_dvc(monkeypatch, dead)
    c = client(repo)
    with tracking.stage_run(params, repo, "download") as first:
        pass
    if stage_status == "RUNNING":  # killed with the stage still running
        c.update_run(first.run_id, status="RUNNING")
    under_dvc(monkeypatch, alive_key())
    with tracking.stage_run(params, repo, "clean") as second:
        assert second.trial_id != first.trial_id
    ended = c.get_run(first.trial_id)
    assert ended.info.status == trial_status
    if trial_status == "FAILED":
        assert ended.data.tags["chexops.failed_stage"] == "download"
        assert "ended while download ran" in ended.data.tags["chexops.error"]
        assert c.get_run(first.run_id).info.status == "FAILED"
    else:
        assert "only part of the pipeline ran" in ended.data.tags["chexops.partial"]
    assert ended.info.end_time == c.get_run(first.run_id).info.end_time


FIND_KEY = "from chexops.tracking import trial; print(trial.invocation_key())"


def test_the_invocation_is_the_nearest_dvc_process_among_the_ancestors(tmp_path):
    """A stand-in `dvc` executable (this Python, named dvc) runs a shell, which runs the stage
    command: the key names the stand-in's pid, as DVC's `$SHELL -c cmd` would be seen."""
    fake = tmp_path / "bin/dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    f"sys.exit(subprocess.call(['/bin/sh', '-c', sys.argv[1]]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "DVC_STAGE": "clean", "PYTHONPATH": f"{REPO / 'src'}"}
    cmd = f"{sys.executable} -c '{FIND_KEY}'; echo $PPID"
    proc = subprocess.Popen([str(fake), cmd], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    key, _shell_parent = out.split()
    host, pid, _started = key.rsplit(":", 2)
    assert host == socket.gethostname() and int(pid) == proc.pid
    env.pop("DVC_STAGE")
    outside = subprocess.run([str(fake), f"{sys.executable} -c '{FIND_KEY}'"], env=env,
                             capture_output=True, text=True, timeout=120).stdout.strip()
    assert outside == "None"  # no DVC_STAGE: not a stage command


def test_a_stage_run_logs_system_metrics(repo, params, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracking.stage_run(params, repo, "clean") as run:
        time.sleep(1.5)
    logged = client(repo).get_run(run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in logged, sorted(logged)
    assert "system/system_memory_usage_megabytes" in logged, sorted(logged)


def test_a_tuning_trial_carries_its_study_number_and_values(repo, params, monkeypatch):
    under_dvc(monkeypatch, alive_key(), "s-t3")
    monkeypatch.setenv(trial.TUNE_STUDY_ENV, "s")
    monkeypatch.setenv(trial.TUNE_TRIAL_ENV, "3")
    monkeypatch.setenv(trial.TUNE_VALUES_ENV, '{"rounds.r2.lr": 0.0004, "train.augment.preset": "light"}')
    with tracking.stage_run(params, repo, "download") as first:
        pass
    tags = client(repo).get_run(first.trial_id).data.tags
    assert tags[trial.STUDY_TAG] == "s" and tags[trial.TRIAL_NUMBER_TAG] == "3"
    assert tags["chexops.tune.param.rounds.r2.lr"] == "0.0004"
    assert tags["chexops.tune.param.train.augment.preset"] == "light"
    for key in (trial.TUNE_STUDY_ENV, trial.TUNE_TRIAL_ENV, trial.TUNE_VALUES_ENV):
        monkeypatch.delenv(key)
    assert trial.tune_tags() == {}  # outside a study: no tune tags at all


def test_a_pruned_trial_ends_killed_and_tagged_pruned(repo, params, monkeypatch):
    under_dvc(monkeypatch, alive_key())
    with tracking.stage_run(params, repo, "download") as first:
        pass
    assert trial.fail_trial(params, repo, "train-round-5", "pruned after round 4",
                            pruned_after=4) == first.trial_id
    ended = client(repo).get_run(first.trial_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[trial.STATE_TAG] == "PRUNED"
    assert ended.data.tags[trial.PRUNED_TAG] == "4"
    assert "chexops.failed_stage" not in ended.data.tags  # pruned is not a failed stage


def test_the_tune_launcher_runs_dvc_in_process_and_counts_as_the_dvc_process():
    python = sys.executable
    assert trial._is_dvc([python, "-m", "chexops.tuning.launch", "s-t0", "exp", "run"])
    assert trial._is_dvc(["/venv/bin/dvc", "exp", "run"]) and trial._is_dvc([python, "-m", "dvc"])
    assert not trial._is_dvc([python, "-m", "chexops.cli", "tune"])
    assert not trial._is_dvc([python, "-m"])


def test_an_orphaned_tuning_trial_ended_between_stages_is_failed(repo, params, monkeypatch):
    """A tune worker killed between two stages: the trial is not a partial `dvc repro`, it failed."""
    dead = f"{socket.gethostname()}:999999998:12.00"  # no such process
    under_dvc(monkeypatch, dead)
    monkeypatch.setenv(trial.TUNE_STUDY_ENV, "s")
    monkeypatch.setenv(trial.TUNE_TRIAL_ENV, "0")
    with tracking.stage_run(params, repo, "download") as first:
        pass
    for key in (trial.TUNE_STUDY_ENV, trial.TUNE_TRIAL_ENV):
        monkeypatch.delenv(key)
    under_dvc(monkeypatch, alive_key())
    with tracking.stage_run(params, repo, "clean"):
        pass
    ended = client(repo).get_run(first.trial_id)
    assert ended.info.status == "FAILED"
    assert "ended between two stages" in ended.data.tags["chexops.error"]
    assert "chexops.partial" not in ended.data.tags
