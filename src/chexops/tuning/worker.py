"""One `chexops tune` worker: asks the study for a trial, runs it as a DVC experiment in a temp
workspace, tells the study how it ended, until the study holds N finished (complete or pruned)
trials. Any number of workers, on one machine or several, share a study through its storage.

- A trial is `dvc exp run --temp -n <study>-t<number> -S ++param=value ...` (through
  chexops.tuning.launch); its stages learn the trial from the environment (TUNE_*), so its
  MLflow trial run is tagged with the study, number and values, and its rounds report to it.
- From ask to tell, a thread of the worker records the trial's heartbeat in the storage (Optuna
  does this inside Study.optimize only); a trial whose worker died (no heartbeat for
  2 x tune.heartbeat_s) is failed by the next worker that looks
  (optuna.storages.fail_stale_trials), which then runs a trial in its place.
- Exactly N: a worker starts a trial only while finished + running trials < N, and gives a trial
  up at once (FAIL, user attribute chexops.surplus) when trials numbered before it already fill
  N: two workers asking at the same instant cannot both take the last place.
- The objective is read from the experiment's metrics/evaluate.json (validation only).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.trial import TrialState

from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.tracking import trial as mlflow_trial
from chexops.tuning import results
from chexops.tuning.report import pruned_after
from chexops.tuning.results import EXP_ATTR, RUN_ATTR, SURPLUS_ATTR, WORKER_ATTR
from chexops.tuning.space import experiment_name, set_args, suggest

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OCCUPYING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
STOP_GRACE_S = 20.0
FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing stops instead of failing them all


@dataclass
class Worker:
    params: Params
    root: Path              # the main repository (where `dvc exp run` starts)
    url: str                # the storage URL (absolute)
    study: Any              # optuna.Study
    storage: Any            # its RDBStorage (heartbeats)
    n_trials: int
    deadline: float | None  # time.monotonic() after which no trial starts

    @property
    def name(self) -> str:
        return str(self.study.study_name)


def run(worker: Worker) -> list[int]:
    """Run trials until the study holds worker.n_trials finished ones (or the deadline passes);
    returns the numbers of the trials this worker ran."""
    ran: list[int] = []
    failed_in_a_row = 0
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    while True:
        optuna.storages.fail_stale_trials(worker.study)
        states = [t.state for t in worker.study.get_trials(deepcopy=False)]
        finished = sum(s in FINISHED for s in states)
        if finished >= worker.n_trials:
            return ran
        if worker.deadline is not None and time.monotonic() > worker.deadline:
            print(f"chexops tune: --timeout reached; {finished} of {worker.n_trials} trials "
                  f"finished", file=sys.stderr)
            return ran
        if sum(s in OCCUPYING for s in states) >= worker.n_trials:
            time.sleep(worker.params.tune.heartbeat_s)  # others' trials may yet fail
            continue
        with warnings.catch_warnings():  # "heartbeat is for Study.optimize": we beat ourselves
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = worker.study.ask()
        state = _run_beating(worker, trial)
        if state is None:  # surplus: never ran
            continue
        ran.append(trial.number)
        failed_in_a_row = failed_in_a_row + 1 if state == TrialState.FAIL else 0
        if failed_in_a_row >= FAILURES_IN_A_ROW:
            raise ChexopsError(f"{failed_in_a_row} trials in a row failed (the last: "
                               f"{experiment_name(worker.name, trial.number)}); see their "
                               f"output above, fix the cause and start the worker again")


def _run_beating(worker: Worker, trial: Any) -> TrialState | None:
    """run_trial with the trial's heartbeat recorded from its ask to its tell; None for a
    surplus trial (given up at once). A trial another worker failed meanwhile (its heartbeat
    lapsed) counts as failed."""
    with heartbeat(worker.storage, trial._trial_id, worker.params.tune.heartbeat_s):
        if _surplus(worker, trial.number):
            trial.set_user_attr(SURPLUS_ATTR, True)
            worker.study.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        try:
            return run_trial(worker, trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            print(f"chexops tune: trial {trial.number} was marked failed by another worker "
                  f"while it ran (its heartbeat lapsed)", file=sys.stderr)
            return TrialState.FAIL


@contextlib.contextmanager
def heartbeat(storage: Any, trial_id: int, interval_s: float) -> Iterator[None]:
    """Record the trial's heartbeat every interval_s from a thread while the block runs (the
    storage's SQLAlchemy sessions are per thread); a failed write is reported and retried."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # noqa: BLE001 - a busy database must not end the trial
                print(f"chexops tune: warning: heartbeat not recorded ({exc})", file=sys.stderr)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _surplus(worker: Worker, number: int) -> bool:
    """True when the trials numbered below `number` already fill the study."""
    before = [t for t in worker.study.get_trials(deepcopy=False)
              if t.number < number and t.state in OCCUPYING]
    return len(before) >= worker.n_trials


def trial_env(worker: Worker, trial: Any, values: dict[str, Any]) -> dict[str, str]:
    """The environment of a trial's `dvc exp run`: this one plus the trial (TUNE_*)."""
    return {**os.environ,
            mlflow_trial.TUNE_STORAGE_ENV: worker.url,
            mlflow_trial.TUNE_STUDY_ENV: worker.name,
            mlflow_trial.TUNE_TRIAL_ENV: str(trial.number),
            mlflow_trial.TUNE_TRIAL_ID_ENV: str(trial._trial_id),
            mlflow_trial.TUNE_VALUES_ENV: json.dumps(values)}


def run_trial(worker: Worker, trial: Any) -> TrialState:
    """Sample, run the experiment, tell the study; returns the state told."""
    values = suggest(trial, worker.params.tune.space)
    name = experiment_name(worker.name, trial.number)
    trial.set_user_attr(EXP_ATTR, name)
    print(f"chexops tune: trial {trial.number} ({name}): "
          + ", ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)
    args = ["--wait-for-lock", "exp", "run", "--temp", "-n", name, *set_args(values)]
    try:
        code = launch(worker, name, args, trial_env(worker, trial, values))
    except BaseException:
        worker.study.tell(trial, state=TrialState.FAIL)
        raise
    if code == 0:
        return _tell_finished(worker, trial, name)
    after = pruned_after(worker.storage, trial._trial_id)
    if after is None:
        print(f"chexops tune: trial {trial.number} failed (dvc exit {code}); see its output "
              f"above", file=sys.stderr)
        worker.study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    _note_run(worker, trial)
    worker.study.tell(trial, state=TrialState.PRUNED)
    print(f"chexops tune: trial {trial.number} pruned after round {after}", file=sys.stderr)
    if worker.params.tune.keep_pruned:  # its rounds so far, restored from DVC's run cache
        keep = ["--wait-for-lock", "exp", "run", "--temp", "-n", name, *set_args(values),
                f"train-round-{after}"]
        if launch(worker, name, keep, dict(os.environ)) != 0:
            print(f"chexops tune: warning: could not keep the experiment {name} of the pruned "
                  f"trial {trial.number}", file=sys.stderr)
    return TrialState.PRUNED


def _note_run(worker: Worker, trial: Any) -> None:
    """Record the trial's MLflow trial run on it (none when DVC restored every stage)."""
    run_id = results.trial_run_id(worker.params, worker.root, worker.name, trial.number)
    if run_id:
        trial.set_user_attr(RUN_ATTR, run_id)


def _tell_finished(worker: Worker, trial: Any, name: str) -> TrialState:
    _note_run(worker, trial)
    metrics = results.experiment_metrics(worker.root, name)
    value, why = results.objective(worker.params, metrics)
    if value is None:
        print(f"chexops tune: trial {trial.number}: {why}; marked failed", file=sys.stderr)
        worker.study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    worker.study.tell(trial, value)
    print(f"chexops tune: trial {trial.number} ({name}): {results.metric_name(worker.params)} "
          f"= {value:.4f}", file=sys.stderr)
    return TrialState.COMPLETE


def launch(worker: Worker, name: str, args: list[str], env: dict[str, str]) -> int:
    """Run `dvc ARGS` through the launcher in its own process group; on an interruption the
    whole group is stopped. Returns dvc's exit code."""
    cmd = [sys.executable, "-m", "chexops.tuning.launch", name, *args]
    proc = subprocess.Popen(cmd, cwd=worker.root, env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's group (dvc and the stage it runs), SIGKILL what is left of it
    after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
