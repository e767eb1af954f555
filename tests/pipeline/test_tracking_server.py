"""A team tracking server: a real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied
to --artifacts-destination), the reduced pipeline pointed at it with MLFLOW_TRACKING_URI, and
the runs read back through the REST API. An unreachable server stops a stage at its start."""
from __future__ import annotations

import sys

import pytest
import requests
import yaml

from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params, run
from tests.processes import run_group
from tests.servers import free_port, server

STAGES = {"download", "clean", "resample", "evaluate"} | {f"train-round-{k}" for k in range(1, 6)}
SERVER_DEADLINE_S = 180  # the server takes up to ~50 s to come up on a busy 2-core machine


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
           "--artifacts-destination", str(tmp / "server-artifacts")]
    # a team server runs as the docs say: without MLflow's job runners (chexops uses none)
    env = {**pipeline_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with server(cmd, f"{url}/health", tmp / "server.log", SERVER_DEADLINE_S, env):
        yield {"url": url, "artifacts": tmp / "server-artifacts"}


def rest(base: str, endpoint: str, body: dict | None = None, get: bool = False) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    resp = requests.get(url, params=body, timeout=30) if get else \
        requests.post(url, json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def search(base: str, exp_id: str, flt: str) -> list[dict]:
    return rest(base, "runs/search", {"experiment_ids": [exp_id], "filter": flt,
                                      "max_results": 1000}).get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.slow
def test_reduced_pipeline_logs_to_a_tracking_server_read_back_over_rest(mlflow_server, tmp_path):
    base = mlflow_server["url"]
    params = reduced_params({"runtime": {"threads": 1}, "train": {"max_batches": 3}})
    repo = make_repo_copy(tmp_path / "repo", params)
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": base}
    run(["dvc", "repro"], repo, env)
    # nothing went to the embedded store: clients never write the server's disk or their own
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()

    exp = rest(base, "experiments/get-by-name", {"experiment_name": "chexops"}, get=True)
    exp_id = exp["experiment"]["experiment_id"]
    trials = search(base, exp_id, "tags.`chexops.trial` = 'true'")
    assert len(trials) == 1
    trial = trials[0]
    trial_id = trial["info"]["run_id"]
    kids = search(base, exp_id, f"tags.`mlflow.parentRunId` = '{trial_id}'")
    assert {tags(k)["chexops.stage"] for k in kids} == STAGES
    assert any(m["key"].endswith("auroc") for m in trial["data"]["metrics"])
    # the built-in synthetic source's hidden truth reached evaluate: the ceiling it allows
    logged = {m["key"]: m["value"] for m in trial["data"]["metrics"]}
    assert logged["evaluate.Cardiomegaly.ceiling_auroc"] > 0.9  # the truth separates the classes
    assert logged["evaluate.Cardiomegaly.test.ceiling_auroc"] > 0.9   # and on the test cohort
    assert tags(trial)["git.commit"] and "data.md5.data/raw" in tags(trial)
    # artifacts were proxied to the server's --artifacts-destination
    round5 = next(k for k in kids if tags(k)["chexops.stage"] == "train-round-5")
    listed = rest(base, "artifacts/list", {"run_id": round5["info"]["run_id"], "path": "model"},
                  get=True)
    assert any(f["path"].endswith("best.safetensors") for f in listed["files"])
    for kid in kids:
        if tags(kid)["chexops.stage"].startswith("train-round-"):
            stored = mlflow_server["artifacts"] / exp_id / kid["info"]["run_id"] / "artifacts"
            assert (stored / "model/best.safetensors").is_file(), stored


def test_unreachable_server_fails_the_first_stage_at_its_start(tmp_path):
    repo = make_repo_copy(tmp_path / "repo", reduced_params({"runtime": {"threads": 1}}))
    port = free_port()  # nothing listens here
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{port}"}
    proc = run_group([str(VENV_BIN / "dvc"), "repro"], cwd=repo, env=env, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"chexops download: error: MLflow tracking server http://127.0.0.1:{port} is " \
           f"unreachable; start it or unset MLFLOW_TRACKING_URI" in out
    assert "s3cret" not in out  # credentials in the URI are never printed
    assert "Running stage 'clean'" not in out
    assert not (repo / "data/raw/chexpert.zip").exists()
    # only the source fingerprint (no MLflow run) got through: download is not locked
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").exists() else {}
    assert set(lock.get("stages") or {}) <= {"source-fingerprint"}
