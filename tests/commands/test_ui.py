"""`make ui` (a README command) serves the MLflow UI on 127.0.0.1 against the embedded store."""
from __future__ import annotations

import pytest

from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params
from tests.servers import free_port, server

pytestmark = pytest.mark.slow

HEALTH_DEADLINE_S = 180  # mlflow can take tens of seconds to come up here


def test_make_ui_serves_mlflow_on_loopback(tmp_path):
    repo = make_repo_copy(tmp_path / "repo", reduced_params())
    port = free_port()
    # make, chexops ui and the mlflow server (with its workers) in one process group, stopped
    # as a group afterwards: SIGTERM, then SIGKILL for whatever is left (tests/servers.py)
    with server(["make", "-o", "setup", "ui", f"VENV={VENV_BIN.parent}", f"PORT={port}"],
                f"http://127.0.0.1:{port}/health", tmp_path / "ui.log", HEALTH_DEADLINE_S,
                env=pipeline_env(), cwd=repo):
        pass  # server() returns only once /health answered 200, else fails with the log
    assert (repo / "mlflow.db").exists()  # the embedded SQLite store at the repo root
