"""`make ui` (a README command) serves the MLflow UI on 127.0.0.1 against the embedded store."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, limit_s: float = 180) -> bool:
    """Poll until the server answers: mlflow can take tens of seconds to come up here."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            time.sleep(0.5)
    return False


def test_make_ui_serves_mlflow_on_loopback(tmp_path):
    repo = make_repo_copy(tmp_path, reduced_params())
    port = free_port()
    proc = subprocess.Popen(["make", "-o", "setup", "ui", f"VENV={VENV_BIN.parent}", f"PORT={port}"],
                            cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        healthy = wait_for_health(f"http://127.0.0.1:{port}/health", proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert healthy, output[-3000:]
    assert (repo / "mlflow.db").exists()  # the embedded SQLite store at the repo root
