"""`chexops tune` on a copy of the shared reduced pipeline: real workers, `dvc exp run --temp`,
the embedded MLflow store and a SQLite study.

- two workers started at once run 4 trials in all: 4 DVC experiments, 4 MLflow trial runs, one
  study of 4 finished trials, none lost or duplicated, the two workers' trials at the same time;
- a worker killed with SIGKILL mid-trial: its trial ends failed, nothing of it keeps training,
  and the other worker finishes the study;
- pruning: every value of the search loses to a finished trial, so the trial is pruned after
  round 4 and round 5 never trains; its DVC experiment is kept (rounds 1-4).

The searches touch round-level params only, so download/clean/resample (and earlier rounds)
come from the DVC cache; evaluate registers no model and draws no Grad-CAM (seconds each).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.pipeline_repo import SHARED, VENV_BIN, copy_built, pipeline_env, run
from tests.processes import popen_group, stop_group

pytestmark = [pytest.mark.slow, SHARED]

FAST_EVALUATE = {"register": False, "gradcam_per_kind": 0}
R5_SPACE = {"rounds.r5.lr": {"log_uniform": [1.0e-5, 1.0e-3]}}
R4_SPACE = {"rounds.r4.lr": {"log_uniform": [1.0e-4, 1.0e-2]}}
TIMEOUT_S = 900


def tune_repo(built, dest: Path, space: dict, **tune) -> Path:
    """A copy of the shared pipeline whose tune section searches `space` (and `tune` settings)."""
    repo = copy_built(built, dest, {"evaluate": FAST_EVALUATE})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"] = {**params["tune"], "heartbeat_s": 3, **tune, "space": space}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-q", "-am", "the search"], repo, pipeline_env())
    return repo


def start_worker(repo: Path, name: str, *args: str):
    """`chexops ARGS` (a tune worker) in its own process group, its output in ../<name>.log."""
    log = (repo.parent / f"{name}.log").open("w")
    return popen_group([str(VENV_BIN / "chexops"), *args], cwd=repo, env=pipeline_env(),
                       stdout=log, stderr=log, text=True)


def wait_all(procs: list, repo: Path) -> None:
    end = time.monotonic() + TIMEOUT_S
    for name, proc in procs:
        proc.wait(timeout=max(1.0, end - time.monotonic()))
        out = (repo.parent / f"{name}.log").read_text()
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-6000:]}"


def study_of(repo: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo / 'optuna.db'}")


def mlflow(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return client, client.get_experiment_by_name("chexops").experiment_id


def trial_runs(repo: Path, study: str) -> dict[int, object]:
    client, exp_id = mlflow(repo)
    runs = client.search_runs([exp_id], f"tags.`chexops.tune.study` = '{study}' and "
                                        f"tags.`chexops.trial` = 'true'", max_results=100)
    numbers = [int(r.data.tags["chexops.tune.trial"]) for r in runs]
    assert len(numbers) == len(set(numbers)), numbers  # one trial run per trial
    return dict(zip(numbers, runs))


def experiments(repo: Path) -> dict[str, str]:
    """{DVC experiment name: its commit's params.yaml} as `dvc exp show` lists them."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, pipeline_env()).stdout)
    names = {r["name"] for base in shown for exp in (base.get("experiments") or [])
             for r in exp.get("revs", []) if r.get("name")}
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], repo,
               pipeline_env()).stdout.split()
    by_name = {r.rsplit("/", 1)[-1]: r for r in refs}
    assert names <= set(by_name), (names, by_name)
    return {n: run(["git", "show", f"{by_name[n]}:params.yaml"], repo, pipeline_env()).stdout
            for n in names}


def test_two_workers_share_one_study_without_losing_or_doubling_a_trial(shared_pipeline, tmp_path):
    from optuna.trial import TrialState

    repo = tune_repo(shared_pipeline, tmp_path / "repo", R5_SPACE, pruner={"kind": "none"})
    procs = [(name, start_worker(repo, name, "tune", "--trials", "4", "--study", "duo")) for name in "ab"]
    try:
        wait_all(procs, repo)
    finally:
        for _, proc in procs:
            stop_group(proc)
    study = study_of(repo, "duo")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert len({t.user_attrs["chexops.worker"] for t in trials}) == 2  # both workers ran trials
    names = {t.user_attrs["chexops.dvc_experiment"] for t in trials}
    assert names == {f"duo-t{n}" for n in range(4)}
    # 4 DVC experiments, each with its trial's sampled value in its params
    shown = experiments(repo)
    assert names <= set(shown)
    for t in trials:
        params = yaml.safe_load(shown[t.user_attrs["chexops.dvc_experiment"]])
        assert params["rounds"]["r5"]["lr"] == pytest.approx(t.params["rounds.r5.lr"], rel=1e-12)
    # 4 MLflow trial runs, tagged with study, number and value, each the one the study names
    runs = trial_runs(repo, "duo")
    assert sorted(runs) == [0, 1, 2, 3]
    client, _ = mlflow(repo)
    for t in trials:
        r = runs[t.number]
        assert r.info.run_id == t.user_attrs["chexops.mlflow_run_id"]
        assert r.info.status == "FINISHED" and r.data.tags["dvc.exp_name"] == f"duo-t{t.number}"
        assert float(r.data.tags["chexops.tune.param.rounds.r5.lr"]) == t.params["rounds.r5.lr"]
        assert r.data.metrics["evaluate.Cardiomegaly.auroc"] == pytest.approx(t.value)
        history = client.get_metric_history(r.info.run_id, "evaluate.Cardiomegaly.auroc")
        assert len(history) == 1  # nothing logged twice
    # the two workers' trials ran at the same time
    spans = {}
    for t in trials:
        w = t.user_attrs["chexops.worker"]
        r = runs[t.number].info
        lo, hi = spans.get(w, (r.start_time, r.end_time))
        spans[w] = (min(lo, r.start_time), max(hi, r.end_time))
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, spans
    # the end: one summary run, the plots, the best trial printed by both workers
    report = repo / "reports/tune/duo"
    assert {p.name for p in report.iterdir()} == {"summary.json", "optimization_history.png",
                                                  "param_importances.png", "parallel_coordinate.png"}
    best = json.loads((report / "summary.json").read_text())["best"]
    assert best["value"] == study.best_value  # ties are common at this size: the first wins
    assert best["experiment"] == f"duo-t{best['number']}"
    summaries = client.search_runs([runs[0].info.experiment_id],
                                   "tags.`chexops.tune.summary` = 'true'")
    assert len(summaries) == 1
    assert summaries[0].data.tags["chexops.tune.best_run_id"] == best["mlflow_run_id"]
    for name in "ab":
        assert f"DVC experiment: {best['experiment']}" in (repo.parent / f"{name}.log").read_text()
    # compare works on two trials by their DVC experiment names
    out = run([str(VENV_BIN / "chexops"), "compare", "duo-t0", "duo-t1", "--json"], repo,
              pipeline_env()).stdout
    assert json.loads(out)["A"] == "duo-t0" and len(json.loads(out)["targets"]) == 1


def test_a_killed_workers_trial_fails_and_the_other_worker_finishes(shared_pipeline, tmp_path):
    """Trials that lose to a finished one end after round 4 (pruned, about a minute each), so
    the study finishes quickly; what matters here is what happens to the killed one."""
    from optuna.trial import TrialState

    repo = tune_repo(shared_pipeline, tmp_path / "repo", R4_SPACE,
                     pruner={"kind": "median", "startup_trials": 1, "warmup_rounds": 0})
    seed_perfect_trial(repo, "kill")
    victim = start_worker(repo, "victim", "tune", "--trials", "3", "--study", "kill")
    other = start_worker(repo, "other", "tune", "--trials", "3", "--study", "kill")
    try:
        pid = f":{victim.pid}"
        running = wait_for(lambda: [t for t in study_of(repo, "kill").get_trials()
                                    if t.user_attrs.get("chexops.worker", "").endswith(pid)
                                    and t.state == TrialState.RUNNING
                                    and t.number in trial_runs(repo, "kill")], "a training trial")
        left = launched(f"kill-t{running[0].number}")  # its dvc (in-process) and its stage
        assert left, "the killed worker's trial has no launcher running"
        os.kill(victim.pid, signal.SIGKILL)  # the worker alone: what it started must follow
        victim.wait(timeout=30)
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                 for p in left), "the killed worker's dvc and stage to end",
                 timeout=60)
        wait_all([("other", other)], repo)
    finally:
        for proc in (victim, other):
            stop_group(proc)
    study = study_of(repo, "kill")
    states = {t.number: t.state for t in study.get_trials()}
    killed = running[0].number
    assert states[killed] == TrialState.FAIL  # not running forever
    finished = [n for n, s in states.items() if s in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and killed not in finished  # the other worker finished the study
    assert TrialState.RUNNING not in states.values()
    # the killed trial's MLflow run was ended too (its dvc process is gone)
    assert trial_runs(repo, "kill")[killed].info.status == "FAILED"


def test_a_losing_value_is_pruned_before_round_5_and_its_experiment_kept(shared_pipeline,
                                                                         tmp_path):
    from optuna.trial import TrialState

    repo = tune_repo(shared_pipeline, tmp_path / "repo", R4_SPACE, keep_pruned=True,
                     pruner={"kind": "median", "startup_trials": 1, "warmup_rounds": 0})
    seed_perfect_trial(repo, "prune")
    proc = start_worker(repo, "w", "tune", "--trials", "2", "--study", "prune")
    try:
        wait_all([("w", proc)], repo)
    finally:
        stop_group(proc)
    new = study_of(repo, "prune").get_trials()[1]
    assert new.state == TrialState.PRUNED
    assert list(new.intermediate_values) == [4]  # round 4 reported; round 5 never did
    assert new.user_attrs["chexops.pruned_after_round"] == 4
    run_ = trial_runs(repo, "prune")[1]
    assert run_.info.status == "KILLED"
    assert run_.data.tags["chexops.tune.state"] == "PRUNED"
    assert run_.data.tags["chexops.tune.pruned_after_round"] == "4"
    client, exp_id = mlflow(repo)
    kids = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run_.info.run_id}'")
    assert {k.data.tags["chexops.stage"] for k in kids} == {"train-round-4"}  # no round 5
    assert "was pruned after round 4" in (tmp_path / "w.log").read_text()
    # kept: the experiment holds round 4 of the pruned value (from DVC's run cache)
    params = yaml.safe_load(experiments(repo)["prune-t1"])
    assert params["rounds"]["r4"]["lr"] == pytest.approx(new.params["rounds.r4.lr"], rel=1e-12)


def launched(experiment: str) -> list:
    """The launcher running `experiment` and every process under it (psutil.Process)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "chexops.tuning.launch" in cmd and experiment in cmd:
            found += [proc, *proc.children(recursive=True)]
    return found


def seed_perfect_trial(repo: Path, name: str) -> None:
    """A finished trial that reached AUROC 1.0 after every round (as a prior result added to
    the study): every value of the search loses to it."""
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{repo / 'optuna.db'}",
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"rounds.r4.lr": 1e-3},
        distributions={"rounds.r4.lr": FloatDistribution(1e-4, 1e-2, log=True)},
        value=1.0, intermediate_values={k: 1.0 for k in range(1, 6)}))


def wait_for(found, what: str, timeout: float = TIMEOUT_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):  # the store may be mid-creation
            value = found()
            if value:
                return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")
