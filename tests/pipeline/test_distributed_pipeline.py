"""`runtime.distributed: torchrun` through `dvc repro`: the reduced round 1 re-launches itself as
2 gloo processes; rank 0 alone writes the outputs and logs one MLflow run."""
from __future__ import annotations

import json

import pytest

from tests.pipeline_repo import make_repo_copy, pipeline_env, reduced_params, run

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_a_round_as_two_torchrun_processes(tmp_path):
    extra = {"runtime": {"threads": 2, "workers": 0, "device": "cpu",
                         "distributed": "torchrun", "nproc_per_node": 2}}
    repo = make_repo_copy(tmp_path / "repo", reduced_params(extra))
    env = {**pipeline_env(), "OMP_NUM_THREADS": "1"}
    out = run(["dvc", "repro", "train-round-1"], repo, env)
    assert "relaunching under torchrun" in out.stderr
    assert "--standalone --nproc_per_node=2" in out.stderr
    meta = json.loads((repo / "models/round-1/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["batch_size"] == 16
    metrics = json.loads((repo / "metrics/round-1.json").read_text())
    assert 0.0 <= metrics["auroc"] <= 1.0
    # the whole validation split was scored, not one rank's shard
    import pandas as pd
    n_valid = len(pd.read_parquet(repo / "data/resampled/valid.parquet"))
    assert sum(map(sum, metrics["confusion"])) == n_valid
    assert (repo / "models/round-1/best.safetensors").is_file()
    assert not (repo / "checkpoints/round-1").exists()

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chexops")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("chexops.stage") == "train-round-1"]
    assert len(runs) == 1 and runs[0].info.run_id == meta["run_id"]
    assert len(client.get_metric_history(meta["run_id"], "auroc")) == 1
