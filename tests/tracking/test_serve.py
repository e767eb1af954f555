"""`mlflow models serve -m models:/<name>@champion` answers a REST prediction on loopback."""
from __future__ import annotations

import base64
import json
import math
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from chexops.commands import predict
from chexops.tracking import registry, store
from tests.servers import free_port, server
from tests.tiny_model import png_bytes, radiograph, tiny_params, tiny_weights

READY_DEADLINE_S = 180


@pytest.mark.slow
def test_served_champion_answers_rest_invocations(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_params(tmp_path)
    client, exp_id = store.open_store(params, tmp_path)
    run_id = client.create_run(exp_id, run_name="evaluate").info.run_id
    weights = tiny_weights(tmp_path, params)
    info = registry.log_model(params, tmp_path, run_id, weights)
    registry.register(info.model_uri, "chexops-serve", champion=True)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri(params, tmp_path),
           "OMP_NUM_THREADS": "1",  # the server runs `uvicorn` from PATH: this venv's bin first
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    url = f"http://127.0.0.1:{port}"
    images = [png_bytes(radiograph(s)) for s in (3, 4, 5)]
    rows = [[base64.b64encode(b).decode()] for b in images] + [["bm90IGFuIGltYWdl"]]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    # the server and its workers in one process group, stopped as a group afterwards:
    # SIGTERM, then SIGKILL for whatever is left (tests/servers.py)
    with server([str(mlflow_cli), "models", "serve", "-m", "models:/chexops-serve@champion",
                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                f"{url}/ping", tmp_path / "serve.log", READY_DEADLINE_S, env=env, cwd=tmp_path):
        req = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())["predictions"]
    assert len(answer) == 4
    assert [a["error"] for a in answer[:3]] == ["", "", ""]
    # the served champion gives the very numbers of its weights file, scored directly
    direct = predict.predictor_from_weights(weights, params).predict(images)["Cardiomegaly"]
    np.testing.assert_allclose([a["Cardiomegaly"] for a in answer[:3]], direct, rtol=0, atol=1e-6)
    flagged = answer[3]["Cardiomegaly"]  # MLflow's JSON writes the missing probability as NaN
    assert (flagged is None or math.isnan(flagged)) and "not a readable image" in answer[3]["error"]
