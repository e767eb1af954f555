"""Resume after kill -9, end to end: a reduced round 1 (3 epochs) is SIGKILLed by process group
mid-run, after its first checkpoint exists; `dvc repro` again resumes it (same MLflow run, log
and meta.json say from which epoch) and it finishes with the same weights and metrics as an
uninterrupted run of the same round (`dvc repro -f`) on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.pipeline_repo import make_repo_copy, pipeline_env, reduced_params, run
from tests.processes import popen_group, stop_group

pytestmark = pytest.mark.slow

STAGE = "train-round-1"
CHECKPOINT = Path("checkpoints/round-1/last.pt")
KILL_WAIT_S = 600


def _repo(tmp_path: Path) -> Path:
    extra = {"runtime": {"threads": 1, "workers": 0, "device": "cpu"},
             "rounds": {**reduced_params()["rounds"], "r1": {"epochs": 3, "freeze": False}}}
    dest = make_repo_copy(tmp_path / "repo", reduced_params(extra))
    run(["dvc", "repro", "resample"], dest, pipeline_env())
    return dest


def _kill_after_first_checkpoint(repo: Path) -> None:
    """Start the round, SIGKILL dvc and the trainer (one process group) once epoch 1's checkpoint
    is on disk, i.e. during epoch 2."""
    proc = popen_group(["dvc", "repro", STAGE], cwd=repo, env=pipeline_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while not (repo / CHECKPOINT).exists():
            if proc.poll() is not None:
                pytest.fail(f"the round ended before its first checkpoint:\n"
                            f"{proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the kill under test: no grace, dvc and the trainer
        proc.wait()
    except BaseException:  # the test failed before its kill: stop dvc and the round anyway
        stop_group(proc)
        raise
    finally:
        proc.stderr.close()


def _outputs(repo: Path) -> tuple[dict, dict, dict]:
    weights = load_file(str(repo / "models/round-1/best.safetensors"))
    metrics = json.loads((repo / "metrics/round-1.json").read_text())
    meta = json.loads((repo / "models/round-1/meta.json").read_text())
    return weights, metrics, meta


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_round_killed_mid_epoch_resumes_and_matches_an_uninterrupted_run(tmp_path):
    repo = _repo(tmp_path)
    _kill_after_first_checkpoint(repo)
    saved = torch.load(repo / CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1  # killed during epoch 2
    run_id = saved["run_id"]

    resumed = run(["dvc", "repro", STAGE], repo, pipeline_env())
    assert "resuming after epoch 1 from its checkpoint" in resumed.stderr
    assert not (repo / CHECKPOINT).exists()  # a finished round removes its checkpoint
    weights, metrics, meta = _outputs(repo)
    assert meta["resumed_from_epoch"] == 1 and meta["run_id"] == run_id
    assert json.loads((repo / f"runs/{STAGE}.json").read_text())["run_id"] == run_id
    mlflow_run = _client(repo).get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    steps = [m.step for m in _client(repo).get_metric_history(run_id, "auroc")]
    assert sorted(steps) == [1, 2, 3]  # the killed epoch 2 was never logged

    fresh = run(["dvc", "repro", "-f", "-s", STAGE], repo, pipeline_env())
    assert "resuming" not in fresh.stderr
    weights2, metrics2, meta2 = _outputs(repo)
    assert meta2["resumed_from_epoch"] is None and meta2["run_id"] != run_id
    assert metrics2 == metrics
    assert weights2.keys() == weights.keys()
    for key in weights:
        assert torch.equal(weights[key], weights2[key]), key
