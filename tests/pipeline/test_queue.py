"""Parallel trials: two processes writing the embedded SQLite store at once lose no runs and never
fail with "database is locked"; `dvc exp run --queue` x2 + `dvc queue start -j 2` runs two reduced
trials at once, both land in the main repo's store (not in DVC's temp workspaces)."""
from __future__ import annotations

import ast
import contextlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.pipeline_repo import SHARED, VENV_BIN, pipeline_env, run
from tests.processes import group, run_group

QUEUED = ["q-fast", "q-slow"]
STAGES = {"download", "clean", "resample", "evaluate"} | {f"train-round-{k}" for k in range(1, 6)}

# one writer: N stage runs with per-step metrics and an artifact, then its trial run; both
# writers meet at a barrier (tests/processes.py) once mlflow is imported, so they open the new
# store and write together; the last line printed: {"trial": id, "runs": [its run ids]}
WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlflow  # noqa: F401  (imported before the barrier: the slow part of starting)
    from chexops.tracking import runs as tracking
    from chexops.tracking import trial as trials
    from chexops.config import params_from_dict
    from tests.pipeline_repo import reduced_params
    from tests.processes import file_barrier

    root, n, barrier = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    params = params_from_dict(reduced_params())
    file_barrier(barrier, root.name, 2)
    last, ids = None, []
    for i in range(n):
        with tracking.stage_run(params, root, "download") as run:
            for step in range(5):
                run.log_metrics({"loss": 1.0 / (step + 1), "auroc": 0.5 + step / 10}, step=step)
            run.log_dict({"i": i}, "note.json")
            last = run
            ids.append(run.run_id)
    trial = trials.close_trial(params, root, last, {"evaluate": {"auroc": 0.75}})
    print(json.dumps({"trial": trial, "runs": ids + [trial]}))
""")


def overlap(spans: dict[str, tuple[int, int]]) -> bool:
    """True when the two (start, end) spans share some time."""
    (a0, a1), (b0, b1) = spans.values()
    return a0 < b1 and b0 < a1


@pytest.mark.slow  # two interpreters importing mlflow: ~12 s
def test_two_writers_share_the_embedded_sqlite_store_without_losing_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "shared.db"
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    repo_root = Path(__file__).resolve().parents[2]
    n = 4
    with contextlib.ExitStack() as stack:  # a failure or a hang stops both writers' groups
        procs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            procs.append(stack.enter_context(group(
                [sys.executable, "-c", WRITER, str(tmp_path / name), str(n),
                 str(tmp_path / "barrier")], cwd=repo_root, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    written = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("chexops")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == 2 * (n + 1)
    assert all(r.info.status == "FINISHED" for r in runs)
    trials = [r for r in runs if r.data.tags.get("chexops.trial") == "true"]
    assert sorted(r.info.run_id for r in trials) == sorted(w["trial"] for w in written)
    by_id = {r.info.run_id: r for r in runs}
    assert sorted(by_id) == sorted(i for w in written for i in w["runs"])  # none lost or mixed
    for r in runs:
        if r.data.tags.get("chexops.trial") != "true":
            assert len(client.get_metric_history(r.info.run_id, "loss")) == 5
    # the two writers really wrote at the same time: their runs' time spans overlap
    spans = {name: (min(by_id[i].info.start_time for i in w["runs"]),
                    max(by_id[i].info.end_time for i in w["runs"]))
             for name, w in zip("ab", written)}
    assert overlap(spans), spans


def queue_done(repo: Path, env: dict) -> bool:
    """True when no queued experiment is waiting or running any more."""
    status = run_group([str(VENV_BIN / "dvc"), "queue", "status"], repo, env, timeout=120).stdout
    return not any(word in status for word in ("Queued", "Running"))


@pytest.mark.slow
@SHARED
def test_queued_experiments_run_two_at_once_into_the_main_store(shared_pipeline):
    """Two trials queued on the shared pipeline. They vary round 5's learning rate, so rounds 1-4
    are restored from the DVC cache (linked, not re-run) and the two run round 5 and evaluate."""
    from mlflow.tracking import MlflowClient

    repo, env = shared_pipeline.repo, pipeline_env()
    lrs = {"q-fast": [2.0e-5, 2.0e-4], "q-slow": [5.0e-6, 5.0e-5]}
    for name, lr in lrs.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"rounds.r5.lr={lr}"], repo, env)
    finished = False
    try:
        run(["dvc", "queue", "start", "-j", "2"], repo, env)
        deadline = time.monotonic() + 900  # a hang fails here instead of at pytest's timeout
        while not queue_done(repo, env):
            assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo, env).stdout
            time.sleep(5)
        finished = True
    finally:
        if not finished:  # the workers are DVC daemons in their own session: stop them here
            stop_queue(repo, env, QUEUED)
    status = run(["dvc", "queue", "status"], repo, env).stdout
    assert sum(f"{name}" in line and "Success" in line for line in status.splitlines()
               for name in QUEUED) == 2, status + _queue_logs(repo, env)

    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    assert "q-fast" in shown and "q-slow" in shown
    # both trials are in the main repo's store; nothing was left in DVC's temp workspaces
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chexops")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    trials = {r.data.tags.get("dvc.exp_name"): r for r in runs
              if r.data.tags.get("chexops.trial") == "true" and
              r.data.tags.get("dvc.exp_name") in QUEUED}
    assert set(trials) == set(QUEUED)
    assert trials["q-fast"].info.run_id != trials["q-slow"].info.run_id
    for name, lr in lrs.items():
        trial = trials[name]
        assert ast.literal_eval(trial.data.params["rounds.r5.lr"]) == pytest.approx(lr)
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        ran = {k.data.tags["chexops.stage"] for k in kids}
        assert ran == {"train-round-5", "evaluate"}, ran
        assert all(k.info.status == "FINISHED" for k in kids)
        for stage in STAGES - ran:  # the cached stages are linked to the runs that made them
            assert by_id[trial.data.tags[f"stage.{stage}.run_id"]].data.tags["chexops.stage"] == stage
    # the two experiments ran at once: from each one's first stage run to its trial's end, the
    # MLflow time spans overlap (run one after the other, they could not). Their start cannot
    # be synchronised from here: the stages are the pipeline's own commands, started by DVC's
    # queue workers, and a barrier would have to go into the pipeline under test. So `-j 2` is
    # what makes them concurrent, and this overlap is the check that it did.
    spans = {name: (min(k.info.start_time for k in runs
                        if k.data.tags.get("mlflow.parentRunId") == t.info.run_id),
                    t.info.end_time) for name, t in trials.items()}
    assert overlap(spans), spans
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))


def stop_queue(repo: Path, env: dict, names: list[str]) -> None:
    """After a failure: interrupt the queued experiments' running tasks and stop the workers,
    killing what still runs (best effort: each command's own failure is ignored)."""
    dvc = str(VENV_BIN / "dvc")
    for cmd in ([dvc, "queue", "kill", "--force", *names], [dvc, "queue", "stop", "--kill"]):
        with contextlib.suppress(subprocess.TimeoutExpired):
            run_group(cmd, repo, env, timeout=120)


def _queue_logs(repo: Path, env: dict) -> str:
    out = []
    for name in QUEUED:
        proc = run_group([str(VENV_BIN / "dvc"), "queue", "logs", name], repo, env, timeout=120)
        out.append(proc.stdout[-3000:] + proc.stderr[-1000:])
    return "\n".join(out)
