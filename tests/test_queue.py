"""Parallel trials: two processes writing the embedded SQLite store at once lose no runs and never
fail with "database is locked"; `dvc exp run --queue` x2 + `dvc queue start -j 2` runs two reduced
trials at once, both land in the main repo's store (not in DVC's temp workspaces)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params, run

STAGES = {"download", "clean", "resample", "evaluate"} | {f"train-round-{k}" for k in range(1, 6)}

# one writer: N stage runs with per-step metrics and an artifact, then its trial run
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from chexops import tracking
    from chexops.config import params_from_dict
    from tests.pipeline_repo import reduced_params

    root, n, start_at = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    params = params_from_dict(reduced_params())
    time.sleep(max(0.0, start_at - time.time()))  # both writers open the new store together
    last = None
    for i in range(n):
        with tracking.stage_run(params, root, "download") as run:
            for step in range(5):
                run.log_metrics({"loss": 1.0 / (step + 1), "auroc": 0.5 + step / 10}, step=step)
            run.log_dict({"i": i}, "note.json")
            last = run.run_id
    print(tracking.close_trial(params, root, last, {"evaluate": {"auroc": 0.75}}))
""")


@pytest.mark.slow  # two interpreters importing mlflow: ~12 s
def test_two_writers_share_the_embedded_sqlite_store_without_losing_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "shared.db"
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    repo_root = Path(__file__).resolve().parents[1]
    n, start_at = 4, time.time() + 6  # time for both interpreters to import mlflow
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / name), str(n),
                                       str(start_at)], cwd=repo_root, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("chexops")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == 2 * (n + 1)
    assert all(r.info.status == "FINISHED" for r in runs)
    trials = [r for r in runs if r.data.tags.get("chexops.trial") == "true"]
    assert sorted(r.info.run_id for r in trials) == sorted(o.strip().splitlines()[-1] for o, _ in outs)
    for r in runs:
        if r.data.tags.get("chexops.trial") != "true":
            assert len(client.get_metric_history(r.info.run_id, "loss")) == 5


def queue_done(repo: Path, env: dict) -> bool:
    """True when no queued experiment is waiting or running any more."""
    status = subprocess.run([str(VENV_BIN / "dvc"), "queue", "status"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120).stdout
    return not any(word in status for word in ("Queued", "Running"))


@pytest.mark.slow
def test_queued_experiments_run_two_at_once_into_the_main_store(tmp_path):
    from mlflow.tracking import MlflowClient

    params = reduced_params({"runtime": {"threads": 1}, "train": {"max_batches": 3}})
    repo = make_repo_copy(tmp_path / "repo", params)
    env = pipeline_env()
    run(["dvc", "exp", "run", "--queue", "-n", "q-fast", "-S", "lr=0.002"], repo, env)
    run(["dvc", "exp", "run", "--queue", "-n", "q-slow", "-S", "lr=0.0005"], repo, env)
    run(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.monotonic() + 900  # a hang fails here instead of at pytest's timeout
    while not queue_done(repo, env):
        assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo, env).stdout
        time.sleep(10)
    status = run(["dvc", "queue", "status"], repo, env).stdout
    assert status.count("Success") == 2, status + _queue_logs(repo, env)

    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    assert "q-fast" in shown and "q-slow" in shown
    # both trials are in the main repo's store; nothing was left in DVC's temp workspaces
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chexops")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = {r.data.tags.get("dvc.exp_name"): r for r in runs
              if r.data.tags.get("chexops.trial") == "true"}
    assert set(trials) == {"q-fast", "q-slow"}
    assert trials["q-fast"].info.run_id != trials["q-slow"].info.run_id
    for name, lr in (("q-fast", 0.002), ("q-slow", 0.0005)):
        trial = trials[name]
        assert float(trial.data.params["lr"]) == pytest.approx(lr)
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert {k.data.tags["chexops.stage"] for k in kids} == STAGES
        assert all(k.info.status == "FINISHED" for k in kids)
    # the two trials' rounds overlapped in time (they really ran at once)
    spans = {name: (min(k.info.start_time for k in runs
                        if k.data.tags.get("mlflow.parentRunId") == t.info.run_id),
                    t.info.end_time) for name, t in trials.items()}
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, spans
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))


def _queue_logs(repo: Path, env: dict) -> str:
    out = []
    for name in ("q-fast", "q-slow"):
        proc = subprocess.run([str(VENV_BIN / "dvc"), "queue", "logs", name], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        out.append(proc.stdout[-3000:] + proc.stderr[-1000:])
    return "\n".join(out)
