"""`mlflow models serve -m models:/<name>@champion` answers a REST prediction on loopback."""
from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chexops import registry, tracking
from tests.tiny_model import png_bytes, radiograph, tiny_params, tiny_weights

READY_DEADLINE_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    """Poll /ping until it answers 200, the server dies, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)  # poll interval, not a fixed wait: readiness decides
    raise AssertionError(f"server not ready within {deadline_s} s")


@pytest.mark.slow
def test_served_champion_answers_rest_invocations(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_params(tmp_path)
    client, exp_id = tracking.open_store(params, tmp_path)
    run_id = client.create_run(exp_id, run_name="evaluate").info.run_id
    info = registry.log_model(params, tmp_path, run_id, tiny_weights(tmp_path, params))
    registry.register(info.model_uri, "chexops-serve", champion=True)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(params, tmp_path),
           "OMP_NUM_THREADS": "1",  # the server runs `uvicorn` from PATH: this venv's bin first
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/chexops-serve@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                             "--workers", "1"],
                            env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, READY_DEADLINE_S)
        good = base64.b64encode(png_bytes(radiograph(3))).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[good], ["bm90IGFuIGltYWdl"]]}}).encode()
        req = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group we started
            proc.wait(timeout=30)
    assert len(answer) == 2
    assert 0 <= answer[0]["Cardiomegaly"] <= 1 and answer[0]["error"] == ""
    flagged = answer[1]["Cardiomegaly"]  # MLflow's JSON writes the missing probability as NaN
    assert (flagged is None or math.isnan(flagged)) and "not a readable image" in answer[1]["error"]
